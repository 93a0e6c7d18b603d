"""Constrained decoding with the bundled model in-process: compile time per grammar backend
(cold and cached) and decode tokens/s constrained vs unconstrained.

    .venv/bin/python -m bench.constrained --help

The constrained rows' schema (a list of at least 8 products) cannot be complete within
--new-tokens, so every row, with or without a grammar, makes exactly --new-tokens tokens
(unconstrained rows get min_new_tokens). Greedy; grammars are compiled before timing starts.
Prints one JSON document."""

from __future__ import annotations

import json
import statistics
import time

from bench.common import (
    BUNDLED_MODEL,
    add_model_flags,
    bench_parser,
    dtype_name,
    engine_for,
    machine,
    served_model,
    threads_or_default,
)
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
    parser = bench_parser(__doc__)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=list(constraints.BACKENDS))
    add_model_flags(parser, pack_weights=False)
    args = parser.parse_args()

    from worker.engine.grammar import GrammarCompiler
    from worker.main import configure_threads

    threads = configure_threads(threads_or_default(args.threads))
    loaded = served_model(dtype=args.dtype)
    engine = engine_for(loaded)
    report: dict = {
        "model": BUNDLED_MODEL,
        "dtype": dtype_name(loaded.dtype),
        "threads": threads,
        **machine(),
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
