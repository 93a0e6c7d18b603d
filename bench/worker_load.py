"""A real `mmserve worker` driven the way the API drives one, without HTTP: the arrivals
workload, Poisson arrival times, the worker process, and one request's token times.

Requests are RQ jobs on the worker's consumer group; their token events are read from Redis
pub/sub, so a trace's times are the worker's and Redis's, not the API's."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import redis

from bench.common import add_model_flags
from shared import events, jobs, keys, registry
from shared.payload import GenerateRequest, GenerationJob

QUESTIONS = [
    "Why is the sky blue?",
    "Give advice to someone learning to cook.",
    "List some uses for a paperclip.",
    "Explain how a bicycle stays upright.",
    "What makes a good cup of tea?",
]
DOCUMENT = (
    "The lighthouse stood at the end of a long spit of rock, and every evening the keeper climbed "
    "its one hundred and twelve steps to light the lamp. Ships passed far out at sea; some he knew by "
    "their lights, others he never saw again. "
)
OUTPUT_LENGTHS = [16, 32, 64]

# the worker modes: their --batching and --joint-prefill flags
WORKER_MODES = {
    "continuous": ("continuous", "auto"),
    "continuous_separate_prefill": ("continuous", "off"),
    "micro": ("micro", "auto"),
}


def workload(count: int, seed: int, output_lengths: list[int] = OUTPUT_LENGTHS) -> list[dict]:
    """The requests: prompt text and output length (the same for every mode and rate).
    Each document starts with its own page number, so no two share more than the
    chat template's opening: a prefix cache (transformers' continuous batching has
    one) gets no more from this workload than from distinct documents."""
    rng = random.Random(seed)
    work = []
    for index in range(count):
        if rng.random() < 0.25:
            text = f"Logbook, page {index + 1}.\n" + DOCUMENT * 5 + "\nSummarise this story in one sentence."
        else:
            text = QUESTIONS[index % len(QUESTIONS)]
        work.append({"text": text, "new_tokens": rng.choice(output_lengths)})
    return work


def arrival_times(count: int, rate: float, seed: int) -> list[float]:
    """Poisson arrivals at `rate` per second, from 0; the same for a given count, rate and seed."""
    rng = random.Random(seed * 1000 + int(rate * 100))
    now, times = 0.0, []
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(rate)
    return times


def add_worker_flags(parser) -> None:
    """The worker flags the benches set: batch size, prefill width, dtype, threads, weight packing."""
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--prefill-width-multiple", type=int, default=1, help="the worker's flag")
    add_model_flags(parser)


class WorkerUnderTest:
    """One `mmserve worker` in `mode` (a WORKER_MODES key) on its own consumer group, started
    and registered as ready; its log is /tmp/mmserve-bench-worker-<mode>.log."""

    def __init__(self, redis_url: str, mode: str, args):
        self.redis_url = redis_url
        batching, joint_prefill = WORKER_MODES[mode]
        self.log_path = Path(f"/tmp/mmserve-bench-worker-{mode}.log")
        argv = [
            sys.executable,
            "-m",
            "mmserve",
            "worker",
            "--redis-url",
            redis_url,
            "--batching",
            batching,
            "--joint-prefill",
            joint_prefill,
            "--max-batch-size",
            str(args.max_batch_size),
            "--threads",
            str(args.threads),
            "--dtype",
            args.dtype,
            "--pack-weights",
            args.pack_weights,
            "--prefill-width-multiple",
            str(args.prefill_width_multiple),
            "--consumer-group",
            f"bench-{mode}",
            "--log-level",
            "INFO",
        ]
        self.group = f"bench-{mode}"
        self.process = subprocess.Popen(argv, stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 300
        while not any(r.ready for r in registry.live_readers(client, self.group)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("worker did not start:\n" + self.log_path.read_text()[-3000:])
            time.sleep(0.5)

    def submitter(self):
        """submit(item, trace) for run_arrivals: one request of the workload to this worker."""

        def submit(item, trace):
            one_request(self.redis_url, self.group, item["text"], item["new_tokens"], trace)

        return submit

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def one_request(redis_url: str, group: str, text: str, new_tokens: int, trace: dict) -> None:
    """Subscribe to the request's events, enqueue its job, and append each token's arrival time
    to trace["tokens"] (trace["arrival"]: when the job was enqueued)."""
    client = redis.Redis.from_url(redis_url)
    request_id = uuid.uuid4().hex
    pubsub = client.pubsub()
    pubsub.subscribe(keys.events_channel(request_id))
    pubsub.get_message(timeout=5)  # the confirmation
    request = GenerateRequest(
        text=text,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        use_chat_template=True,
        consumer_group=group,
    )
    job = GenerationJob(request_id=request_id, request=request, seed=1, enqueued_at=time.time())
    queue = jobs.queue_for(client, group)
    trace["arrival"] = time.perf_counter()
    jobs.enqueue(queue, job)
    while True:
        message = pubsub.get_message(timeout=120)
        if message is None:
            raise RuntimeError("no event for 120 s")
        if message["type"] != "message":
            continue
        event = events.decode(message["data"])
        if event.type == "token":
            trace["tokens"].append(time.perf_counter())
        elif event.type in ("done", "error"):
            break
    pubsub.close()


def warm_up(submit) -> None:
    """Two requests at once, outside the figures (first-use costs: shapes, caches)."""
    run_arrivals(submit, workload(2, 99), [0.0, 0.0])


def run_arrivals(submit, work: list[dict], times: list[float]) -> list[dict]:
    """Call submit(item, trace) at each arrival time, each in its own thread."""
    traces = [{"arrival": None, "tokens": []} for _ in work]
    threads = []
    start = time.perf_counter()
    for item, at, trace in zip(work, times, traces, strict=True):
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=submit, args=(item, trace), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(600)
    return traces
