"""Throughput of the text path: HTTP streaming clients vs the engine in-process
vs HF generate one prompt at a time, with the default model.

    .venv/bin/python bench/throughput.py [--concurrency 1 4 8 16] [--new-tokens 64]

Greedy, every completion forced to exactly --new-tokens tokens (min_new_tokens),
so every path does the same work. Prints one JSON document."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.serving import ServeProcess, percentile
from tests.support.sse import iter_lines, parse_sse

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "List some uses for a paperclip.",
    "Describe the water cycle to a child.",
    "What makes a good cup of tea?",
    "Summarise the plot of a heist movie.",
    "Give advice to someone learning to cook.",
    "Why is the sky blue?",
]


def prompts_for(count: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(count)]


# -- HTTP ----------------------------------------------------------------------


def stream_one(url: str, prompt: str, new_tokens: int) -> tuple[float, int, float]:
    """(time to first token, tokens, total seconds) for one streaming request."""
    payload = {
        "text": prompt,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "use_chat_template": True,
        "return_metadata": True,
    }
    started = time.perf_counter()
    first = None
    tokens = 0
    with requests.post(url + "/generate_stream", json=payload, stream=True, timeout=600) as response:
        response.raise_for_status()
        for event in parse_sse(iter_lines(response)):
            if event.event == "message" and first is None:
                first = time.perf_counter() - started
            elif event.event == "metadata":
                tokens = event.json()["completion_tokens"]
            elif event.event == "error":
                raise RuntimeError(event.data)
    return first or float("nan"), tokens, time.perf_counter() - started


def bench_http(url: str, concurrency: int, rounds: int, new_tokens: int) -> dict:
    count = concurrency * rounds
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: stream_one(url, p, new_tokens), prompts_for(count)))
    elapsed = time.perf_counter() - started
    ttfts = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {
        "concurrency": concurrency,
        "requests": count,
        "tokens": tokens,
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 2),
        "ttft_p50_s": round(percentile(ttfts, 50), 3),
        "ttft_p95_s": round(percentile(ttfts, 95), 3),
    }


def start_server(args) -> ServeProcess:
    return ServeProcess.for_benchmark(
        max_batch_size=max(args.concurrency),
        dtype=args.dtype,
        threads=args.threads,
        quantize=args.quantize,
        pack_weights=args.pack_weights,
    )


# -- in-process ----------------------------------------------------------------


def bench_engine(loaded, concurrency: int, rounds: int, new_tokens: int) -> dict:
    from worker.engine.engine import Engine
    from worker.engine.rows import GenerationParams, RowRequest

    engine = Engine(loaded.model, loaded.tokenizer, device=loaded.device)
    params = GenerationParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    tokens = 0
    ttfts: list[float] = []
    started = time.perf_counter()
    for round_index in range(rounds):
        batch_started = time.perf_counter()
        rows = [
            RowRequest(
                key=(round_index, i),
                prompt_ids=engine.encode_prompt(p, use_chat_template=True),
                params=params,
            )
            for i, p in enumerate(prompts_for(concurrency))
        ]
        engine.add(rows)
        first = True
        while engine.has_work:
            outputs = engine.step()
            if first:
                ttfts += [time.perf_counter() - batch_started] * len(outputs)
                first = False
            tokens += sum(1 for o in outputs if o.token_id is not None)
    elapsed = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "tokens": tokens,
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 2),
        "ttft_p50_s": round(percentile(ttfts, 50), 3),
        "ttft_p95_s": round(percentile(ttfts, 95), 3),
    }


def bench_hf_generate(loaded, count: int, new_tokens: int) -> dict:
    import torch

    tokens = 0
    started = time.perf_counter()
    for prompt in prompts_for(count):
        inputs = loaded.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        ).to(loaded.device)
        with torch.inference_mode():
            output = loaded.model.generate(
                **inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens
            )
        tokens += output.shape[1] - inputs["input_ids"].shape[1]
    elapsed = time.perf_counter() - started
    return {
        "requests": count,
        "tokens": tokens,
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--quantize", default="none", choices=["none", "int8", "int4"], help="mmserve's --quantize"
    )
    parser.add_argument(
        "--pack-weights", default="auto", choices=["auto", "off"], help="mmserve's --pack-weights"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads, same for every path (default: what `mmserve serve` picks)",
    )
    args = parser.parse_args()

    from shared.settings import WorkerSettings
    from worker.engine.models.loading import load_model
    from worker.main import configure_threads, default_threads, load_for_serving

    args.threads = args.threads or default_threads(1)
    report: dict = {
        "model": "SmolLM2-135M-Instruct (bundled)",
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }

    server = start_server(args)
    url = server.url
    try:
        bench_http(url, 1, 1, 8)  # warm-up
        report["http"] = [bench_http(url, c, args.rounds, args.new_tokens) for c in args.concurrency]
    finally:
        server.stop()

    configure_threads(args.threads)
    loaded = load_for_serving(
        WorkerSettings(redis_url="", dtype=args.dtype, quantize=args.quantize, pack_weights=args.pack_weights)
    )
    report["dtype"] = str(loaded.dtype).removeprefix("torch.")
    report["quantize"] = args.quantize
    report["pack_weights"] = args.pack_weights
    bench_engine(loaded, 1, 1, 8)  # warm-up
    report["in_process"] = [bench_engine(loaded, c, args.rounds, args.new_tokens) for c in args.concurrency]
    del loaded
    stock = load_model(None, dtype=args.dtype)  # HF generate as transformers ships it: no packing, no int8
    report["hf_generate_one_at_a_time"] = {
        "dtype": str(stock.dtype).removeprefix("torch."),
        **bench_hf_generate(stock, 4, args.new_tokens),
    }

    by_concurrency = {row["concurrency"]: row for row in report["http"]}
    for row in report["in_process"]:
        http = by_concurrency[row["concurrency"]]
        http["ratio_http_over_in_process"] = round(http["tokens_per_s"] / row["tokens_per_s"], 3)
    if 1 in by_concurrency and 8 in by_concurrency:
        report["http_c8_over_c1"] = round(
            by_concurrency[8]["tokens_per_s"] / by_concurrency[1]["tokens_per_s"], 2
        )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
