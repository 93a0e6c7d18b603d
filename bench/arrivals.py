"""Serving under Poisson arrivals with the bundled model: mmserve's worker in each of its
batching modes vs HF `generate` serving one request at a time vs transformers' own continuous
batching; and where a decode step's time goes.

    .venv/bin/python -m bench.arrivals --help

Every mode serves the same requests (bench/worker_load.py: mixed prompt lengths, forced
output lengths, greedy) at the same arrival times for a given rate. The worker modes run a
real `mmserve worker` each, started once side by side; transformers' modes run in this
process; HF `generate` is timed once per request and its FIFO queue replayed for each rate.
With --repeats N each rate runs N times per worker mode, the modes back to back in
alternating order; figures are medians over the runs, and a ratio of two modes is the median
of the ratios of back-to-back runs. Prints one JSON document."""

from __future__ import annotations

import json
import statistics
import time

import redis

from bench.common import (
    BUNDLED_MODEL,
    bench_parser,
    chat_prompt_ids,
    dtype_name,
    engine_for,
    machine,
    median_of,
    percentile,
    served_model,
    threads_or_default,
)
from bench.worker_load import (
    OUTPUT_LENGTHS,
    QUESTIONS,
    WORKER_MODES,
    WorkerUnderTest,
    add_worker_flags,
    arrival_times,
    run_arrivals,
    warm_up,
    workload,
)
from mmserve.redis_server import RedisServer
from shared.payload import GenerateRequest, GenerationJob


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


def measure_rates(submit, work, args) -> dict:
    """A warm-up, then the workload at every arrival rate: {rate: summary}."""
    warm_up(submit)
    return {
        str(rate): summarise(run_arrivals(submit, work, arrival_times(len(work), rate, args.seed)))
        for rate in args.rates
    }


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

        submits = {mode: worker.submitter() for mode, worker in workers.items()}
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
        ids = torch.tensor([chat_prompt_ids(loaded.tokenizer, item["text"])])
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
                chat_prompt_ids(tokenizer, item["text"]),
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
        engine = engine_for(loaded)
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
    parser = bench_parser(__doc__)
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.5], help="requests per second")
    parser.add_argument("--requests", type=int, default=24, help="requests per rate")
    add_worker_flags(parser)
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

    from worker.main import configure_threads

    args.threads = threads_or_default(args.threads)
    work = workload(args.requests, args.seed, args.output_lengths)
    report: dict = {
        "model": BUNDLED_MODEL,
        "threads": args.threads,
        **machine(),
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
        report["dtype"] = dtype_name(loaded.dtype)
        if "hf_generate_one_at_a_time" in in_process:
            report["modes"]["hf_generate_one_at_a_time"] = bench_hf_generate_serial(loaded, args, work)
        if "profile" in in_process:  # the model as a worker serves it (packed weights)
            served = served_model(dtype=args.dtype, pack_weights=args.pack_weights)
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
