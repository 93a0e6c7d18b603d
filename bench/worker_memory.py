"""A continuous-batching worker's memory over a long run: wave after wave of Poisson arrivals
into one real `mmserve worker` (bundled model), its resident set size sampled throughout.

    .venv/bin/python -m bench.worker_memory --help

Rows join and leave the running batch all the time, and every prompt is a question after a
random cut of the arrivals document, so prompt lengths keep changing (`--same-prompts`: the
arrivals workload's few prompts). The report gives the RSS after each wave, the peak, and the
growth from the end of the first wave (allocator warm-up) to the end of the last. Prints one
JSON document."""

from __future__ import annotations

import json
import logging
import random
import statistics
import sys
import threading
import time

import psutil

from bench.common import BUNDLED_MODEL, bench_parser, machine, threads_or_default
from bench.worker_load import (
    DOCUMENT,
    QUESTIONS,
    WorkerUnderTest,
    add_worker_flags,
    arrival_times,
    run_arrivals,
    warm_up,
    workload,
)
from mmserve.redis_server import RedisServer

log = logging.getLogger("bench.worker_memory")


class RssSampler:
    """The peak resident set size of a process, sampled from a thread."""

    def __init__(self, pid: int, every: float = 0.2):
        self.process = psutil.Process(pid)
        self.every = every
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        rss = self.process.memory_info().rss
        self.peak = max(self.peak, rss)
        return rss

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.now()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def varied_workload(count: int, seed: int) -> list[dict]:
    """The arrivals workload's output lengths, each prompt a question after a random cut of the document."""
    rng = random.Random(seed)
    words = (DOCUMENT * 5).split()
    work = []
    for item in workload(count, seed):
        cut = words[: rng.randint(0, len(words))]
        work.append({"text": " ".join([*cut, rng.choice(QUESTIONS)]), "new_tokens": item["new_tokens"]})
    return work


def mb(value: float) -> float:
    return round(value / 2**20, 1)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--waves", type=int, default=10)
    parser.add_argument("--requests", type=int, default=40, help="requests per wave")
    parser.add_argument("--rate", type=float, default=3.0, help="requests per second within a wave")
    add_worker_flags(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--same-prompts", action="store_true", help="the arrivals workload's few prompts")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")

    args.threads = threads_or_default(args.threads)
    redis_server = RedisServer().start()
    worker = WorkerUnderTest(redis_server.url, "continuous", args)
    try:
        submit = worker.submitter()
        warm_up(submit)
        after_wave: list[int] = []
        tokens = 0
        started = time.monotonic()
        with RssSampler(worker.process.pid) as sampler:
            loaded_rss = sampler.now()
            for wave in range(args.waves):
                work = (workload if args.same_prompts else varied_workload)(args.requests, args.seed + wave)
                traces = run_arrivals(submit, work, arrival_times(len(work), args.rate, args.seed + wave))
                tokens += sum(len(trace["tokens"]) for trace in traces)
                after_wave.append(sampler.now())
                log.info("wave %d: worker RSS %.1f MB", wave + 1, mb(after_wave[-1]))
        elapsed = time.monotonic() - started
        later = after_wave[len(after_wave) // 2 :]
        report = {
            "model": BUNDLED_MODEL,
            "batching": "continuous",
            "max_batch_size": args.max_batch_size,
            "threads": args.threads,
            **machine(),
            "waves": args.waves,
            "prompts": "arrivals workload" if args.same_prompts else "varied lengths",
            "prefill_width_multiple": args.prefill_width_multiple,
            "requests": args.waves * args.requests,
            "rate_per_s": args.rate,
            "tokens_generated": tokens,
            "seconds": round(elapsed, 1),
            "rss_mb_after_warm_up": mb(loaded_rss),
            "rss_mb_after_each_wave": [mb(value) for value in after_wave],
            "rss_mb_peak": mb(sampler.peak),
            "rss_mb_growth_first_to_last_wave": mb(after_wave[-1] - after_wave[0]),
            "rss_mb_spread_second_half": mb(max(later) - min(later)),
            "rss_mb_median_second_half": mb(statistics.median(later)),
        }
        print(json.dumps(report, indent=2))
    finally:
        worker.stop()
        redis_server.stop()


if __name__ == "__main__":
    main()
