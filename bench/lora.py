"""LoRA adapters with the bundled model in-process: decode tokens/s with 0, 1 and 3 distinct
adapters in a batch against the base model with no adapters configured, and adapter load time.

    .venv/bin/python -m bench.lora --help        (--quick: a smoke run)

Three random adapters (a0, a1, a2) are made with PEFT in a temporary folder; the cases are in
CASES. Greedy, every row forced to exactly --max-new-tokens tokens, the same prompts in every
case; each case warms up once, then the cases take turns --repeats times. Load time: each
adapter read cold by a fresh engine over a fresh model, and reads after an eviction
(max_loaded=1). Prints one JSON document; progress goes to stderr."""

from __future__ import annotations

import gc
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    BUNDLED_MODEL,
    PROMPTS,
    add_model_flags,
    bench_parser,
    dtype_name,
    engine_for,
    machine,
    served_model,
    threads_or_default,
)

log = logging.getLogger("bench.lora")


ADAPTERS = ["a0", "a1", "a2"]

# name, what it measures, the adapter of each row (cycled over the batch; None = base);
# adapters=None means an engine with no LoRA support at all.
CASES: list[tuple[str, str, list[str | None] | None]] = [
    ("base", "base model, no adapters configured", None),
    ("peft_0_adapters", "PEFT-wrapped model, every row on the base", [None]),
    ("1_adapter", "every row on a0", ["a0"]),
    ("3_adapters", "rows spread over a0, a1, a2", ["a0", "a1", "a2"]),
    ("3_adapters_and_base", "rows spread over a0, a1, a2 and the base", ["a0", "a1", "a2", None]),
]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


# -- adapters -------------------------------------------------------------------


def target_modules(loaded, targets: list[str]) -> str | list[str]:
    """PEFT's target_modules: the names for a text model; for a vision-language
    model a regex over its language model only (the server refuses adapters
    that touch the vision tower)."""
    if loaded.model_type == "VISION":
        return rf".*language_model.*\.({'|'.join(targets)})"
    return targets


def build_adapters(args, directory: Path) -> dict:
    """Save random LoRA adapters a0, a1, a2 for the model under `directory`."""
    import torch
    from peft import LoraConfig, get_peft_model

    from worker.engine.models.loading import load_model

    started = time.perf_counter()
    loaded = load_model(args.model, dtype=args.dtype)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        target_modules=target_modules(loaded, args.targets),
        init_lora_weights=False,
    )
    model = get_peft_model(loaded.model, config)
    parameters = [p for name, p in model.named_parameters() if "lora_" in name]
    for seed, name in enumerate(ADAPTERS):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in parameters:
                noise = torch.empty(parameter.shape, dtype=torch.float32)
                parameter.copy_(noise.normal_(0.0, args.lora_std, generator=generator))
        model.save_pretrained(directory / name)
    size = sum(f.stat().st_size for f in (directory / ADAPTERS[0]).iterdir())
    return {
        "seconds": round(time.perf_counter() - started, 2),
        "lora_parameters": sum(p.numel() for p in parameters),
        "adapter_folder_mb": round(size / 2**20, 2),
    }


def lora_engine(args, directory: Path, max_loaded: int):
    """An engine serving the adapters in `directory`, over a freshly loaded model (PEFT wraps
    the model in place)."""
    from worker.engine.adapters import AdapterCatalog, LoraAdapters

    catalog = AdapterCatalog(directory=directory)
    loaded = served(args, catalog)
    return engine_for(loaded, LoraAdapters(loaded.model, catalog, max_loaded=max_loaded))


def timed_load(engine, name: str) -> dict:
    """One engine.load_adapter: what it reports, and the wall time of the call
    (which also covers an eviction)."""
    started = time.perf_counter()
    seconds = engine.load_adapter(name)
    return {"load_ms": ms(seconds), "call_ms": ms(time.perf_counter() - started)}


def bench_load(args, directory: Path) -> dict:
    cold = []
    for repeat in range(args.repeats):
        engine = lora_engine(args, directory, max_loaded=len(ADAPTERS))
        loads = {name: timed_load(engine, name) for name in ADAPTERS}
        log.info("cold loads, round %d: %s", repeat + 1, loads)
        cold.append(loads)
        del engine
        gc.collect()

    engine = lora_engine(args, directory, max_loaded=1)
    first = timed_load(engine, "a0")
    reloads = []
    for _ in range(args.repeats):
        reloads.append(timed_load(engine, "a1"))  # evicts a0
        reloads.append(timed_load(engine, "a0"))  # evicts a1, reads a0 from disk again
    log.info("reloads after eviction: %s", reloads)
    del engine
    gc.collect()

    def median(loads: list[dict], key: str) -> float:
        return round(statistics.median(load[key] for load in loads), 1)

    return {
        "cold": {
            "note": "fresh engine over a fresh model; the first adapter also wraps the model in PEFT",
            "first_adapter_ms_median": median([r[ADAPTERS[0]] for r in cold], "load_ms"),
            "later_adapter_ms_median": median([r[n] for r in cold for n in ADAPTERS[1:]], "load_ms"),
            "rounds": cold,
        },
        "after_eviction": {
            "note": "max_loaded=1: every load evicts the other adapter and reads this one again",
            "first_load": first,
            "load_ms_median": median(reloads, "load_ms"),
            "call_ms_median": median(reloads, "call_ms"),
            "loads": reloads,
        },
    }


# -- decoding -------------------------------------------------------------------


def row_adapters(pattern: list[str | None] | None, batch: int) -> list[str | None]:
    pattern = pattern or [None]
    return [pattern[i % len(pattern)] for i in range(batch)]


def run_batch(engine, prompts, params, adapters: list[str | None], tag) -> tuple[float, int, dict]:
    """Decode one batch; (seconds, generated tokens, {row: (token ids, text)})."""
    from worker.engine.rows import RowRequest

    rows = [
        RowRequest(key=(tag, i), prompt_ids=p, params=params, adapter=adapter)
        for i, (p, adapter) in enumerate(zip(prompts, adapters, strict=True))
    ]
    outputs: dict = {i: ([], "") for i in range(len(rows))}
    tokens = 0
    started = time.perf_counter()
    engine.add(rows)
    while engine.has_work:
        for output in engine.step():
            if output.token_id is not None:
                tokens += 1
                outputs[output.key[1]][0].append(output.token_id)
            ids, text = outputs[output.key[1]]
            outputs[output.key[1]] = (ids, text + output.text)
    return time.perf_counter() - started, tokens, outputs


def served(args, catalog=None):
    """The model as a worker serves it with these flags, serving the adapters of `catalog` if
    given (its layers then not fused)."""
    return served_model(catalog, model=args.model, dtype=args.dtype, pack_weights=args.pack_weights)


def bench_decode(args, directory: Path) -> tuple[list[dict], dict]:
    from worker.engine.rows import GenerationParams

    loaded = served(args)
    base_engine = engine_for(loaded)
    lora = lora_engine(args, directory, max_loaded=len(ADAPTERS))
    for name in ADAPTERS:  # in memory before anything is timed
        lora.load_adapter(name)
    lora_weight = next(p for n, p in lora.adapters.peft_model.named_parameters() if "lora_A" in n)
    info = {
        "model_dtype": dtype_name(loaded.dtype),
        "lora_weight_dtype": dtype_name(lora_weight.dtype),
    }

    params = GenerationParams(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens)
    prompts = [
        base_engine.encode_prompt(PROMPTS[i % len(PROMPTS)], use_chat_template=True)
        for i in range(args.batch)
    ]
    cases = [
        (name, description, base_engine if pattern is None else lora, row_adapters(pattern, args.batch))
        for name, description, pattern in CASES
    ]

    first_outputs = {}
    for name, _, engine, adapters in cases:  # warm-up
        seconds, tokens, outputs = run_batch(engine, prompts, params, adapters, ("warm-up", name))
        first_outputs[name] = outputs
        log.info("warm-up %s: %d tokens in %.2f s", name, tokens, seconds)

    rates: dict[str, list[float]] = {name: [] for name, *_ in cases}
    tokens_per_run: dict[str, int] = {}
    for repeat in range(args.repeats):
        for name, _, engine, adapters in cases:
            seconds, tokens, _ = run_batch(engine, prompts, params, adapters, (repeat, name))
            expected = args.batch * args.max_new_tokens
            if tokens != expected:
                raise RuntimeError(f"{name}: {tokens} tokens generated, {expected} expected")
            tokens_per_run[name] = tokens
            rates[name].append(tokens / seconds)
            log.info("run %d %s: %.1f tokens/s", repeat + 1, name, tokens / seconds)

    base_median = statistics.median(rates["base"])
    base_best = max(rates["base"])
    base_ids = {i: ids for i, (ids, _) in first_outputs["base"].items()}
    results = []
    for name, description, _, adapters in cases:
        per_adapter: dict[str, int] = {}
        for adapter in adapters:
            per_adapter[adapter or "base"] = per_adapter.get(adapter or "base", 0) + 1
        outputs = first_outputs[name]
        results.append(
            {
                "case": name,
                "description": description,
                "distinct_adapters": len({a for a in adapters if a is not None}),
                "rows": per_adapter,
                "tokens_per_run": tokens_per_run[name],
                "tokens_per_s_median": round(statistics.median(rates[name]), 2),
                "tokens_per_s_best": round(max(rates[name]), 2),
                "ratio_to_base": round(statistics.median(rates[name]) / base_median, 3),
                "ratio_to_base_best": round(max(rates[name]) / base_best, 3),
                "rows_equal_to_base": sum(outputs[i][0] == base_ids[i] for i in outputs),
                "sample": outputs[0][1][:120],
            }
        )
    del base_engine, lora, loaded
    gc.collect()
    return results, info


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--model", default=None, help="a local model folder (default: the bundled model)")
    parser.add_argument("--batch", type=int, default=None, help="rows per batch (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="tokens per row (default 64)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 3)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r (lora_alpha = 2r)")
    parser.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    parser.add_argument("--lora-std", type=float, default=0.02, help="std of the random LoRA weights")
    add_model_flags(parser)
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 4, 8 tokens, 1 repeat")
    args = parser.parse_args()
    quick = {"batch": 4, "max_new_tokens": 8, "repeats": 1}
    full = {"batch": 8, "max_new_tokens": 64, "repeats": 3}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")

    import peft
    import torch

    from worker.main import configure_threads

    threads = configure_threads(threads_or_default(args.threads))
    report: dict = {
        "model": args.model or BUNDLED_MODEL,
        "dtype": args.dtype,
        "threads": threads,
        **machine(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "batch": args.batch,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "rank": args.rank,
        "lora_alpha": 2 * args.rank,
        "targets": args.targets,
        "lora_std": args.lora_std,
        "quick": args.quick,
    }
    with tempfile.TemporaryDirectory(prefix="mmserve-bench-lora-") as tmp:
        directory = Path(tmp)
        report["adapters"] = build_adapters(args, directory)
        gc.collect()
        report["load"] = bench_load(args, directory)
        report["decode"], info = bench_decode(args, directory)
        report["dtype"] = info["model_dtype"]
        report["lora_weight_dtype"] = info["lora_weight_dtype"]
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
