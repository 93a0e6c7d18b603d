"""Constrained decoding: compile time per backend (cold and cached) and decode
tokens/s constrained vs unconstrained, with the default model in-process.

    .venv/bin/python bench/constrained.py [--new-tokens 64] [--batch 1 8]

Decoding is greedy. The constrained rows use a schema (a list of at least 8
products) that cannot be complete within --new-tokens, so every row, with or
without a grammar, generates exactly --new-tokens tokens (unconstrained rows
get min_new_tokens) and tokens/s compare like for like. The grammar is
compiled before timing starts (the cached case). Prints one JSON document."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared import constraints

PROMPTS = [
    "List products from a hardware store as JSON.",
    "Give me a shopping list in JSON.",
    "JSON inventory of a small bakery, please.",
    "Describe some fruit for sale, as JSON.",
    "What does a bookshop sell? Answer in JSON.",
    "Office supplies and their prices, JSON only.",
    "A JSON catalogue of garden tools.",
    "Toys in a toy shop, as a JSON list.",
]

DECODE_SCHEMA = {
    "type": "object",
    "properties": {
        "products": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "price": {"type": "number"},
                    "in_stock": {"type": "boolean"},
                },
                "required": ["name", "price", "in_stock"],
            },
            "minItems": 8,
        }
    },
    "required": ["products"],
}

# Compile-time corpus: what clients typically send.
COMPILE_SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,4}$"},
        },
        "required": ["name", "age"],
    },
    "order": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                    "required": ["sku", "qty"],
                },
                "maxItems": 10,
            },
            "status": {"enum": ["new", "paid", "shipped"]},
        },
        "required": ["id", "items", "status"],
    },
    "products": DECODE_SCHEMA,
    "event": {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "day": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
            "attendees": {"type": "array", "items": {"type": "string"}},
            "online": {"type": "boolean"},
            "location": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "required": ["title", "day", "online"],
    },
}


def bench_compile(compiler, backend: str) -> dict:
    from worker.engine.rows import Constraint

    started = time.perf_counter()
    compiler.backend(backend)
    setup = time.perf_counter() - started
    schemas = {}
    for name, schema in COMPILE_SCHEMAS.items():
        constraint = Constraint(
            constraints.JSON_SCHEMA, json.dumps(constraints.normalize_schema(schema)), backend
        )
        started = time.perf_counter()
        compiler.compile(constraint)
        cold = time.perf_counter() - started
        started = time.perf_counter()
        compiler.compile(constraint)
        cached = time.perf_counter() - started
        schemas[name] = {"cold_ms": round(cold * 1000, 2), "cached_ms": round(cached * 1000, 4)}
    return {"tokenizer_setup_ms": round(setup * 1000, 1), "schemas": schemas}


def bench_decode(engine, backend: str | None, batch: int, new_tokens: int, repeats: int) -> dict:
    from worker.engine.rows import Constraint, GenerationParams, RowRequest

    constraint = None
    if backend is not None:
        constraint = Constraint(
            constraints.JSON_SCHEMA, json.dumps(constraints.normalize_schema(DECODE_SCHEMA)), backend
        )
        engine.prepare_constraint(constraint)  # cached before timing
    params = GenerationParams(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens if constraint is None else 0
    )
    prompts = [engine.encode_prompt(PROMPTS[i % len(PROMPTS)], use_chat_template=True) for i in range(batch)]
    rates, finish_reasons, sample = [], set(), ""
    for repeat in range(repeats):
        rows = [
            RowRequest(key=(repeat, i), prompt_ids=p, params=params, constraint=constraint)
            for i, p in enumerate(prompts)
        ]
        started = time.perf_counter()
        engine.add(rows)
        tokens = 0
        texts: dict = {}
        while engine.has_work:
            for output in engine.step():
                tokens += output.token_id is not None
                texts[output.key] = texts.get(output.key, "") + output.text
                if output.finish_reason:
                    finish_reasons.add(output.finish_reason)
        rates.append(tokens / (time.perf_counter() - started))
        sample = texts[(repeat, 0)]
    return {
        "backend": backend or "none",
        "batch": batch,
        "tokens_per_s": round(statistics.median(rates), 2),
        "finish_reasons": sorted(finish_reasons),
        "sample": sample[:120],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=list(constraints.BACKENDS))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: as `mmserve serve`)"
    )
    args = parser.parse_args()

    from shared.settings import WorkerSettings
    from worker.engine.engine import Engine
    from worker.engine.grammar import GrammarCompiler
    from worker.main import configure_threads, default_threads, load_for_serving

    threads = configure_threads(args.threads or default_threads(1))
    loaded = load_for_serving(WorkerSettings(redis_url="", dtype=args.dtype))  # as a worker serves it
    engine = Engine(loaded.model, loaded.tokenizer, device=loaded.device)
    report: dict = {
        "model": "SmolLM2-135M-Instruct (bundled)",
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "new_tokens": args.new_tokens,
    }

    report["compile"] = {}
    for backend in args.backends:
        fresh = GrammarCompiler(loaded.tokenizer, engine.eos_token_ids, engine.vocab_size)
        report["compile"][backend] = bench_compile(fresh, backend)

    bench_decode(engine, None, 1, 8, 1)  # warm-up
    report["decode"] = []
    for batch in args.batch:
        plain = bench_decode(engine, None, batch, args.new_tokens, args.repeats)
        report["decode"].append(plain)
        for backend in args.backends:
            row = bench_decode(engine, backend, batch, args.new_tokens, args.repeats)
            row["ratio_to_unconstrained"] = round(row["tokens_per_s"] / plain["tokens_per_s"], 3)
            report["decode"].append(row)
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
