"""Constrained decoding with the bundled model in-process: compile time per grammar backend
(cold and cached), decode tokens/s constrained vs unconstrained, and tokens/s with
budget-aware closing vs without.

    .venv/bin/python -m bench.constrained --help

Decode: the constrained rows' schema (a list of at least 8 products) cannot be complete
within --new-tokens, so every row, with or without a grammar, makes exactly --new-tokens
tokens (unconstrained rows get min_new_tokens; the engine does not close answers here, as
no complete answer fits). Budget: the answer `{"ok": boolean, "note": string|null}` under
--budget tokens (the model runs on inside "note"), outlines, with and without closing
answers in time, in pairs of runs whose order alternates (the ratio is the median of the
pairs' ratios); how many answers parse and validate, how many were closed early, and the
share of the closing runs' time spent narrowing choices (measured around the one method
that does it). Greedy; grammars are compiled before timing starts. Prints one JSON document."""

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


BUDGET_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "note": {"type": ["string", "null"]}},
    "required": ["ok", "note"],
}
BUDGET_PROMPTS = [  # each runs on inside "note" until the budget (measured, greedy)
    "Is the service healthy? Answer as JSON with ok and a note explaining in detail every check you ran.",
    "Did the backup succeed? Answer as JSON with ok and a note describing in detail every step of the "
    "backup.",
    "Is the disk nearly full? Answer as JSON with ok and a note explaining in detail what uses the space.",
    "Was the deploy clean? Answer as JSON with ok and a note describing in detail every service that was "
    "restarted.",
]


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
        seconds, texts, last = run_rows(engine, rows)
        rates.append(sum(output.completion_tokens for output in last.values()) / seconds)
        finish_reasons.update(output.finish_reason for output in last.values())
        sample = texts[(repeat, 0)]
    return {
        "backend": backend or "none",
        "batch": batch,
        "tokens_per_s": round(statistics.median(rates), 2),
        "finish_reasons": sorted(finish_reasons),
        "sample": sample[:120],
    }


def run_rows(engine, rows) -> tuple[float, dict, dict]:
    """Decode `rows` to the end: seconds taken, texts and last outputs by key."""
    started = time.perf_counter()
    engine.add(rows)
    texts: dict = {}
    last: dict = {}
    while engine.has_work:
        for output in engine.step():
            texts[output.key] = texts.get(output.key, "") + output.text
            last[output.key] = output
    return time.perf_counter() - started, texts, last


def bench_budget(engines: dict, batch: int, budget: int, repeats: int) -> dict:
    """Tokens/s with closing answers in time ("on") and without ("off"), in pairs of runs
    whose order alternates, and the share of the "on" runs' time spent narrowing choices."""
    import jsonschema

    from worker.engine.grammar.base import GrammarState
    from worker.engine.rows import Constraint, GenerationParams, RowRequest

    constraint = Constraint(constraints.JSON_SCHEMA, json.dumps(BUDGET_SCHEMA), constraints.OUTLINES)
    params = GenerationParams(max_new_tokens=budget)
    prompts = [
        engines["on"].encode_prompt(BUDGET_PROMPTS[i % len(BUDGET_PROMPTS)], use_chat_template=True)
        for i in range(batch)
    ]
    closing = _timed(GrammarState, "_close_in_time")
    results: dict = {
        setting: {"rates": [], "seconds": 0.0, "valid": 0, "answers": 0, "closed_early": 0}
        for setting in engines
    }
    closing_seconds = 0.0
    for repeat in range(repeats):
        order = list(engines) if repeat % 2 == 0 else list(reversed(engines))
        for setting in order:
            engine = engines[setting]
            engine.prepare_constraint(constraint)
            rows = [
                RowRequest(key=(repeat, i), prompt_ids=p, params=params, constraint=constraint)
                for i, p in enumerate(prompts)
            ]
            closing.seconds = 0.0
            seconds, texts, last = run_rows(engine, rows)
            if setting == "on":
                closing_seconds += closing.seconds
            result = results[setting]
            result["rates"].append(sum(o.completion_tokens for o in last.values()) / seconds)
            result["seconds"] += seconds
            result["answers"] += len(texts)
            result["closed_early"] += sum(o.closed_early for o in last.values())
            for text in texts.values():
                try:
                    jsonschema.validate(json.loads(text), BUDGET_SCHEMA)
                    result["valid"] += 1
                except (ValueError, jsonschema.ValidationError):
                    pass
            result["sample"] = texts[(repeat, 0)][-80:]
    closing.restore()
    pairs = [on / off for on, off in zip(results["on"]["rates"], results["off"]["rates"], strict=True)]
    report: dict = {"batch": batch, "budget": budget}
    report["closing_share_of_time"] = round(closing_seconds / results["on"]["seconds"], 5)
    for setting, result in results.items():
        rates = result.pop("rates")
        result.pop("seconds")
        report[setting] = {"tokens_per_s": round(statistics.median(rates), 2), **result}
    report["pair_ratios_on_to_off"] = [round(ratio, 3) for ratio in pairs]
    report["ratio_on_to_off"] = round(statistics.median(pairs), 3)
    return report


class _timed:
    """Adds up the time spent in one method of a class until `restore`."""

    def __init__(self, owner: type, name: str):
        self.owner, self.name, self.seconds = owner, name, 0.0
        self.original = getattr(owner, name)
        timer = self

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return timer.original(*args, **kwargs)
            finally:
                timer.seconds += time.perf_counter() - started

        setattr(owner, name, timed)

    def restore(self) -> None:
        setattr(self.owner, self.name, self.original)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=list(constraints.BACKENDS))
    parser.add_argument("--budget", type=int, default=160, help="max_new_tokens of the budget case")
    parser.add_argument("--budget-repeats", type=int, default=6)
    parser.add_argument("--skip-decode", action="store_true", help="only compile and budget cases")
    add_model_flags(parser, pack_weights=False)
    args = parser.parse_args()

    from worker.engine.grammar import GrammarCompiler
    from worker.main import configure_threads

    threads = configure_threads(threads_or_default(args.threads))
    loaded = served_model(dtype=args.dtype)
    engine = engine_for(loaded, close_in_time=False)  # no complete answer fits in the decode case
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
    for batch in [] if args.skip_decode else args.batch:
        plain = bench_decode(engine, None, batch, args.new_tokens, args.repeats)
        report["decode"].append(plain)
        for backend in args.backends:
            row = bench_decode(engine, backend, batch, args.new_tokens, args.repeats)
            row["ratio_to_unconstrained"] = round(row["tokens_per_s"] / plain["tokens_per_s"], 3)
            report["decode"].append(row)
    engines = {"on": engine_for(loaded), "off": engine}
    report["budget"] = [
        bench_budget(engines, batch, args.budget, args.budget_repeats) for batch in args.batch
    ]
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
