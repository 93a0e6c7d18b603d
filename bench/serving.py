"""`mmserve serve` as a child process on free loopback ports (for the benches and the e2e tests),
and streaming clients of its /generate_stream."""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests

from bench.common import prompts_for, stream_summary
from bench.sse import SseEvent, iter_lines, parse_sse
from mmserve.redis_server import free_port


class ServeProcess:
    """One `mmserve serve`; its output goes to `log_path`, or nowhere."""

    def __init__(self, *flags: str, log_path: Path | None = None):
        self.port, self.management_port, self.openai_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.management_url = f"http://127.0.0.1:{self.management_port}"
        self.log_path = log_path
        argv = [
            sys.executable,
            "-m",
            "mmserve",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--management-port",
            str(self.management_port),
            "--openai-port",
            str(self.openai_port),
            *flags,
        ]
        output = log_path.open("wb") if log_path is not None else subprocess.DEVNULL
        self.process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)

    @classmethod
    def tiny(cls, model: str | Path, *extra: str, log_path: Path | None = None) -> ServeProcess:
        """One worker serving a tiny test model in float32 on one thread (not waited for)."""
        flags = ["--model", str(model), "--workers", "1", "--dtype", "float32", "--threads", "1"]
        return cls(*flags, *extra, log_path=log_path)

    @classmethod
    def for_benchmark(
        cls,
        *extra: str,
        max_batch_size: int,
        dtype: str,
        threads: int,
        quantize: str = "none",
        pack_weights: str = "auto",
        log_path: Path | None = None,
    ) -> ServeProcess:
        """One worker, quiet logs (to `log_path`, or nowhere), the benchmark's batch size, dtype,
        quantization, weight packing and threads; ready."""
        flags = [
            "--workers",
            "1",
            "--max-batch-size",
            str(max_batch_size),
            "--dtype",
            dtype,
            "--threads",
            str(threads),
            "--quantize",
            quantize,
            "--pack-weights",
            pack_weights,
            "--log-level",
            "WARNING",
            *extra,
        ]
        return cls(*flags, log_path=log_path).wait_ready()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path is not None else ""

    def wait_ready(self, timeout: float = 300.0, also: Callable[[], bool] = lambda: True) -> ServeProcess:
        """Wait for /readyz (and `also`); raise with the log's tail if it never comes."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if requests.get(self.url + "/readyz", timeout=1).status_code == 200 and also():
                    return self
            except requests.RequestException:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("mmserve serve did not become ready:\n" + self.log()[-5000:])
            time.sleep(0.5)

    def readers(self, group: str = "primary") -> list[dict]:
        return requests.get(self.management_url + "/reader_groups", timeout=5).json().get(group, [])

    def stop(self, timeout: float = 60.0) -> None:
        """Ctrl-C, as a user would; kill if it does not stop in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def read_answer(response, started: float) -> tuple[float, list[SseEvent]]:
    """Read a streamed answer to its end: (seconds from `started` to its first token, or nan if
    none came; its events). An error event raises."""
    response.raise_for_status()
    first = None
    events = []
    for event in parse_sse(iter_lines(response)):
        if event.event == "error":
            raise RuntimeError(event.data)
        if event.event == "message" and first is None:
            first = time.perf_counter() - started
        events.append(event)
    return first or float("nan"), events


def stream_generate(url: str, prompt: str, new_tokens: int) -> tuple[float, int, float]:
    """(time to first token, tokens, total seconds) of one /generate_stream request,
    greedy and forced to exactly `new_tokens` tokens (min_new_tokens)."""
    payload = {
        "text": prompt,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "use_chat_template": True,
        "return_metadata": True,
    }
    started = time.perf_counter()
    with requests.post(url + "/generate_stream", json=payload, stream=True, timeout=600) as response:
        first, events = read_answer(response, started)
    tokens = next((e.json()["completion_tokens"] for e in events if e.event == "metadata"), 0)
    return first, tokens, time.perf_counter() - started


def generate_streams(url: str, concurrency: int, rounds: int, new_tokens: int) -> dict:
    """`concurrency` clients, each streaming `rounds` requests one after the other."""
    count = concurrency * rounds
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: stream_generate(url, p, new_tokens), prompts_for(count)))
    elapsed = time.perf_counter() - started
    return stream_summary(
        sum(r[1] for r in results), elapsed, [r[0] for r in results], concurrency=concurrency, requests=count
    )
