"""Soak: many concurrent streaming clients against `mmserve serve` with a tiny random model and
several workers, one worker SIGKILLed (and restarted by `serve`) mid-run. Loopback only;
bounded in count and time.

    .venv/bin/python -m bench.soak --help

Every answer is checked against the same prompt's non-streaming answer taken before the run
(greedy, so they must agree): a duplicated or missing token shows up as a mismatch. Prints one
JSON document."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import psutil
import redis
import requests

from bench.common import bench_parser, percentile
from bench.serving import ServeProcess
from bench.sse import iter_lines, parse_sse, sse_form
from bench.tiny_models import build_tiny_llama
from mmserve.redis_server import RedisServer

DEADLINE_SECONDS = 600


def stream(url: str, payload: dict) -> tuple[str | None, float | None, str | None]:
    """(text, time to first token, error) of one streaming request."""
    started = time.perf_counter()
    first = None
    parts: list[str] = []
    try:
        with requests.post(url + "/generate_stream", json=payload, stream=True, timeout=300) as response:
            if response.status_code != 200:
                return None, None, f"HTTP {response.status_code}: {response.text[:200]}"
            for event in parse_sse(iter_lines(response)):
                if event.event == "error":
                    return None, None, event.data
                if event.event == "message":
                    if first is None:
                        first = time.perf_counter() - started
                    parts.append(event.data)
    except requests.RequestException as exc:
        return None, None, str(exc)
    return "".join(parts), first, None


def keys_without_ttl(connection: redis.Redis) -> list[str]:
    """Keys that never expire: the bookkeeping sets of groups, queues and workers
    (a handful whatever the traffic), never per-request data."""
    return sorted(key.decode() for key in connection.scan_iter(count=1000) if connection.ttl(key) == -1)


def api_rss(serve: psutil.Process) -> int:
    return sum(
        child.memory_info().rss
        for child in serve.children(recursive=True)
        if "gunicorn" in " ".join(child.cmdline())
    )


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--kill-after", type=float, default=0.3, help="fraction of answers before the kill")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mmserve-soak-"))
    model = build_tiny_llama(workdir / "model", tokenizer_cache_dir=workdir / "tokenizer")
    redis_server = RedisServer().start()
    serve = ServeProcess(
        "--redis-url",
        redis_server.url,
        "--workers",
        str(args.workers),
        "--model",
        str(model),
        "--dtype",
        "float32",
        "--threads",
        "1",
        "--max-batch-size",
        "16",
        "--log-level",
        "WARNING",
        log_path=workdir / "serve.log",
    )
    url = serve.url
    try:
        serve.wait_ready(300, also=lambda: len(serve.readers()) == args.workers)

        prompts = [f"soak prompt number {i % 16}" for i in range(args.clients)]
        payload = {"max_new_tokens": args.new_tokens}
        expected = {
            p: requests.post(url + "/generate", json={"text": p, **payload}, timeout=60).json()["text"]
            for p in sorted(set(prompts))
        }
        rss_before = api_rss(psutil.Process(serve.process.pid))

        answered = threading.Semaphore(0)
        killed: dict = {}

        def killer() -> None:
            for _ in range(int(args.clients * args.kill_after)):
                answered.acquire()
            victim = serve.readers()[0]
            os.kill(victim["pids"][0], signal.SIGKILL)
            killed.update(reader_id=victim["reader_id"], at=time.monotonic())

        def client(prompt: str):
            result = stream(url, {"text": prompt, **payload})
            answered.release()
            return prompt, result

        threading.Thread(target=killer, daemon=True).start()
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(client, prompts, timeout=DEADLINE_SECONDS))
        elapsed = time.monotonic() - started
        time.sleep(1)
        rss_after = api_rss(psutil.Process(serve.process.pid))
        lasting = keys_without_ttl(redis.Redis.from_url(redis_server.url))
        readers_after = serve.readers()

        completed = [(p, r) for p, r in results if r[2] is None]
        mismatched = sum(1 for p, (text, _, _) in completed if text != sse_form(expected[p]))
        errors = [r[2] for _, r in results if r[2] is not None]
        ttfts = [r[1] for _, r in completed if r[1] is not None]
        print(
            json.dumps(
                {
                    "clients": args.clients,
                    "workers": args.workers,
                    "new_tokens": args.new_tokens,
                    "seconds": round(elapsed, 2),
                    "completed": len(completed),
                    "completed_ratio": round(len(completed) / args.clients, 4),
                    "mismatched_outputs": mismatched,
                    "errors": len(errors),
                    "first_errors": errors[:3],
                    "worker_killed": bool(killed),
                    "workers_live_after": len(readers_after),
                    "ttft_p50_s": round(percentile(ttfts, 50), 3) if ttfts else None,
                    "ttft_p99_s": round(percentile(ttfts, 99), 3) if ttfts else None,
                    "api_rss_mb_before": round(rss_before / 2**20, 1),
                    "api_rss_mb_after": round(rss_after / 2**20, 1),
                    "redis_keys_without_ttl": lasting,
                },
                indent=2,
            )
        )
    finally:
        serve.stop()
        redis_server.stop()


if __name__ == "__main__":
    main()
