"""Throughput of the text path with the bundled model: HTTP streaming clients vs the
engine in-process vs HF generate one prompt at a time.

    .venv/bin/python -m bench.throughput --help

Greedy, every completion forced to exactly --new-tokens tokens (min_new_tokens), so every
path does the same work. Prints one JSON document."""

from __future__ import annotations

import json
import time

from bench.common import (
    BUNDLED_MODEL,
    add_model_flags,
    bench_parser,
    dtype_name,
    engine_for,
    machine,
    prompts_for,
    served_model,
    stream_summary,
    threads_or_default,
)
from bench.serving import ServeProcess, generate_streams


def bench_engine(loaded, concurrency: int, rounds: int, new_tokens: int) -> dict:
    """`rounds` batches of `concurrency` rows through an Engine in this process; every row
    of a batch counts its first token when the batch's first step returns."""
    from worker.engine.rows import GenerationParams, RowRequest

    engine = engine_for(loaded)
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
    return stream_summary(tokens, time.perf_counter() - started, ttfts, concurrency=concurrency)


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
    parser = bench_parser(__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--quantize", default="none", choices=["none", "int8", "int4"], help="mmserve's --quantize"
    )
    add_model_flags(parser, threads_help="torch threads, same for every path (default: as `mmserve serve`)")
    args = parser.parse_args()

    from worker.engine.models.loading import load_model
    from worker.main import configure_threads

    args.threads = threads_or_default(args.threads)
    report: dict = {
        "model": BUNDLED_MODEL,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        **machine(),
    }

    server = ServeProcess.for_benchmark(
        max_batch_size=max(args.concurrency),
        dtype=args.dtype,
        threads=args.threads,
        quantize=args.quantize,
        pack_weights=args.pack_weights,
    )
    try:
        generate_streams(server.url, 1, 1, 8)  # warm-up
        report["http"] = [
            generate_streams(server.url, c, args.rounds, args.new_tokens) for c in args.concurrency
        ]
    finally:
        server.stop()

    configure_threads(args.threads)
    loaded = served_model(dtype=args.dtype, quantize=args.quantize, pack_weights=args.pack_weights)
    report["dtype"] = dtype_name(loaded.dtype)
    report["quantize"] = args.quantize
    report["pack_weights"] = args.pack_weights
    bench_engine(loaded, 1, 1, 8)  # warm-up
    report["in_process"] = [bench_engine(loaded, c, args.rounds, args.new_tokens) for c in args.concurrency]
    del loaded
    stock = load_model(None, dtype=args.dtype)  # HF generate as transformers ships it: no packing, no int8
    report["hf_generate_one_at_a_time"] = {
        "dtype": dtype_name(stock.dtype),
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
