"""Redis failover under load: `mmserve serve` on a Redis found through Sentinel (a master, a
replica, three sentinels on loopback), --streams streaming requests at once, and the master
SIGKILLed at a random moment while they run.

    .venv/bin/python -m bench.failover --help

Counts how the streams ended (completed, ended with an error event, refused with an HTTP error,
hung: still open --hang-seconds after they started), how long the sentinels took to name a new
master, and how long after the kill /readyz answered 200 again and a new request (queued behind
what the streams left) was answered, and how many completed streams differ from the same prompt's
answer asked again after the run (a stream resumed by a re-run job must not); --runs times, a
fresh setup each. Prints one JSON document. Needs Debian's redis-server and redis-sentinel."""

from __future__ import annotations

import concurrent.futures
import json
import random
import tempfile
import threading
import time
from pathlib import Path

import requests

from bench.common import add_model_flags, bench_parser, machine, threads_or_default
from bench.sentinel import SentinelRedis
from bench.serving import ServeProcess
from bench.sse import iter_lines, parse_sse, sse_form

PROBE_INTERVAL_SECONDS = 0.25


def payload(index: int, new_tokens: int) -> dict:
    return {
        "text": f"Write a short story about lighthouse number {index}.",
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
    }


def stream(url: str, index: int, new_tokens: int, hang_seconds: float) -> dict:
    """One streamed request: how it ended and when (seconds on the monotonic clock), and its text."""
    started = time.monotonic()
    outcome, tokens, parts = "completed", 0, []
    try:
        with requests.post(
            url + "/generate_stream", json=payload(index, new_tokens), stream=True, timeout=hang_seconds
        ) as response:
            if response.status_code != 200:
                outcome = f"http_{response.status_code}"
            else:
                for event in parse_sse(iter_lines(response)):
                    if event.event == "error":
                        outcome = "error_event"
                        break
                    tokens += 1
                    parts.append(event.data)
    except requests.Timeout:
        outcome = "hung"
    except requests.ConnectionError:
        outcome = "connection_error"
    return {
        "index": index,
        "outcome": outcome,
        "tokens": tokens,
        "text": "".join(parts),
        "started": started,
        "ended": time.monotonic(),
    }


def probe_until(ok, since: float, deadline: float) -> float | None:
    """Seconds from `since` until `ok()` (None: not before `deadline`), asked every 0.25 s."""
    while time.monotonic() < deadline:
        try:
            if ok():
                return round(time.monotonic() - since, 2)
        except requests.RequestException:
            pass
        time.sleep(PROBE_INTERVAL_SECONDS)
    return None


def undisturbed(url: str, index: int, new_tokens: int) -> str:
    """The same prompt's answer asked again after the failover, not streamed."""
    return requests.post(url + "/generate", json=payload(index, new_tokens), timeout=120).json()["text"]


def ready(url: str) -> bool:
    return requests.get(url + "/readyz", timeout=5).status_code == 200


def served(url: str) -> bool:
    payload = {"text": "ping", "max_new_tokens": 1}
    return requests.post(url + "/generate", json=payload, timeout=60).status_code == 200


def run(args, seed: int | None) -> dict:
    kill_after = random.Random(seed).uniform(*args.kill_between)
    with tempfile.TemporaryDirectory(prefix="mmserve-failover-") as folder:
        redis_setup = SentinelRedis(Path(folder) / "redis").start()
        server = None
        try:
            server = ServeProcess.for_benchmark(
                "--redis-url",
                redis_setup.url,
                "--queue-timeout-seconds",
                str(args.queue_timeout),
                "--next-event-timeout-seconds",
                str(args.queue_timeout),
                max_batch_size=args.max_batch_size,
                dtype=args.dtype,
                threads=threads_or_default(args.threads),
                pack_weights=args.pack_weights,
                log_path=Path(folder) / "serve.log",
            )
            requests.post(
                server.url + "/generate", json={"text": "warm up", "max_new_tokens": 4}, timeout=120
            )
            failover: dict = {}

            def kill() -> None:
                time.sleep(kill_after)
                failover["killed_at"] = time.monotonic()
                failover["sentinel_s"] = round(redis_setup.fail_over(), 2)
                killed, give_up = failover["killed_at"], failover["killed_at"] + args.hang_seconds
                failover["ready_again_s"] = probe_until(lambda: ready(server.url), killed, give_up)
                failover["served_again_s"] = probe_until(lambda: served(server.url), killed, give_up)

            killer = threading.Thread(target=kill)
            started = time.monotonic()
            killer.start()
            with concurrent.futures.ThreadPoolExecutor(args.streams) as pool:
                results = list(
                    pool.map(
                        lambda i: stream(server.url, i, args.new_tokens, args.hang_seconds),
                        range(args.streams),
                    )
                )
            killer.join()
            differing = sum(
                1
                for result in results
                if result["outcome"] == "completed"
                and result["text"] != sse_form(undisturbed(server.url, result["index"], args.new_tokens))
            )
        finally:
            if server is not None:
                server.stop()
            redis_setup.stop()
    killed = failover["killed_at"]
    counts: dict[str, int] = {}
    for result in results:
        counts[result["outcome"]] = counts.get(result["outcome"], 0) + 1
    return {
        "seed": seed,
        "kill_after_s": round(kill_after, 2),
        "outcomes": counts,
        "hung": counts.get("hung", 0),
        "tokens_streamed": sum(r["tokens"] for r in results),
        "completed_differing_from_undisturbed": differing,
        "completed_before_kill": sum(
            1 for r in results if r["outcome"] == "completed" and r["ended"] < killed
        ),
        "sentinel_failover_s": failover["sentinel_s"],
        "ready_again_after_kill_s": failover["ready_again_s"],
        "served_again_after_kill_s": failover["served_again_s"],
        "longest_stream_s": round(max(r["ended"] - r["started"] for r in results), 2),
        "run_s": round(time.monotonic() - started, 2),
        "streams_by_outcome": {
            outcome: sorted(
                (round(r["started"] - killed, 2), round(r["ended"] - killed, 2))
                for r in results
                if r["outcome"] == outcome
            )
            for outcome in counts
        },
    }


def parse_args():
    parser = bench_parser(__doc__)
    parser.add_argument("--streams", type=int, default=50, help="streaming requests sent at once (50)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens of each, forced (32)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument(
        "--kill-between", type=float, nargs=2, default=(1.0, 8.0), metavar=("MIN", "MAX"),
        help="the master is killed this many seconds after the streams start, drawn uniformly (1 8)",
    )  # fmt: skip
    parser.add_argument("--runs", type=int, default=1, help="failovers, each on a fresh setup (1)")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="the first run's kill-moment seed, +1 per run (default: random)",
    )
    parser.add_argument(
        "--queue-timeout", type=float, default=30.0, help="the API's queue and next-event timeouts (30 s)"
    )
    parser.add_argument(
        "--hang-seconds", type=float, default=120.0, help="a stream still open this long has hung (120)"
    )
    add_model_flags(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    runs = [run(args, None if args.seed is None else args.seed + index) for index in range(args.runs)]
    report = {
        "bench": "failover",
        **machine(),
        "streams": args.streams,
        "new_tokens": args.new_tokens,
        "max_batch_size": args.max_batch_size,
        "dtype": args.dtype,
        "queue_timeout_s": args.queue_timeout,
        "runs": len(runs),
        "hung": sum(r["hung"] for r in runs),
        "completed_differing_from_undisturbed": sum(r["completed_differing_from_undisturbed"] for r in runs),
        "outcomes": {
            outcome: sum(r["outcomes"].get(outcome, 0) for r in runs)
            for outcome in sorted({o for r in runs for o in r["outcomes"]})
        },
        "sentinel_failover_s": [r["sentinel_failover_s"] for r in runs],
        "ready_again_after_kill_s": [r["ready_again_after_kill_s"] for r in runs],
        "served_again_after_kill_s": [r["served_again_after_kill_s"] for r in runs],
        "by_run": runs,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
