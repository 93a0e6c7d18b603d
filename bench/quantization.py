"""What `--quantize`, `--dtype` and `--fuse-layers` do to the bundled model's answers and speed.

    .venv/bin/python -m bench.quantization --help

A setting is `quantize[:dtype[:fuse_layers]]` (empty parts: the defaults). Each is loaded as a
worker loads it and runs the engine in-process on 1 torch thread. Quality: per prompt, how many
leading tokens of a greedy, forced-length completion equal the unquantized float32 model's.
Speed: decode steps at batch 1 and 8, the settings taking turns step by step so that a slow
moment of the machine hits them alike; each setting's median step and its fastest. Prints one
JSON document."""

from __future__ import annotations

import json
import statistics
import time

import torch

from bench.common import PROMPTS, bench_parser, engine_for, machine, served_model
from worker.engine.engine import Engine
from worker.engine.rows import GenerationParams, RowRequest

QUALITY_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "Who wrote Hamlet?",
    *PROMPTS,
]
REFERENCE = "none:float32"


def load(setting: str) -> Engine:
    quantize, dtype, fuse_layers = [*setting.split(":"), "", ""][:3]
    return engine_for(
        served_model(quantize=quantize, dtype=dtype or "auto", fuse_layers=fuse_layers or "auto")
    )


def greedy(engine: Engine, new_tokens: int) -> list[list[int]]:
    params = GenerationParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    completions = []
    for prompt in QUALITY_PROMPTS:
        engine.add(
            [
                RowRequest(
                    key=0, prompt_ids=engine.encode_prompt(prompt, use_chat_template=True), params=params
                )
            ]
        )
        tokens = []
        while engine.has_work:
            tokens += [output.token_id for output in engine.step() if output.token_id is not None]
        completions.append(tokens)
    return completions


def leading_equal(a: list[int], b: list[int]) -> int:
    count = 0
    while count < min(len(a), len(b)) and a[count] == b[count]:
        count += 1
    return count


def step_times(engines: dict[str, Engine], rows: int, steps: int) -> dict[str, list[float]]:
    """Each engine's decode steps (ms) with `rows` rows running, the engines taking
    turns step by step, so that a slow moment of the machine hits them all alike."""
    params = GenerationParams(max_new_tokens=steps + 8, min_new_tokens=steps + 8)
    for engine in engines.values():
        engine.add(
            [
                RowRequest(
                    key=i, prompt_ids=engine.encode_prompt(PROMPTS[i], use_chat_template=True), params=params
                )
                for i in range(rows)
            ]
        )
        for _ in range(4):  # the prefill's first token, then warm-up steps
            engine.step()
    times: dict[str, list[float]] = {setting: [] for setting in engines}
    for _ in range(steps):
        for setting, engine in engines.items():
            start = time.perf_counter()
            engine.step()
            times[setting].append((time.perf_counter() - start) * 1000)
    for engine in engines.values():
        engine.clear()
    return times


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["none:bfloat16", "int8", "int4"],
        help="quantize[:dtype[:fuse_layers]] settings to compare with float32 "
        "(default: bfloat16, int8, int4)",
    )
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument(
        "--steps", type=int, default=100, help="timed decode steps per setting and batch size"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    engines = {setting: load(setting) for setting in [REFERENCE, *args.settings]}
    reference = greedy(engines[REFERENCE], args.new_tokens)
    quality = {}
    for setting in args.settings:
        leading = [
            leading_equal(a, b)
            for a, b in zip(reference, greedy(engines[setting], args.new_tokens), strict=True)
        ]
        quality[setting] = {
            "leading_tokens_equal_to_float32": leading,
            "mean": round(statistics.fmean(leading), 1),
            "prompts_all_equal": sum(n == args.new_tokens for n in leading),
        }
    speed = {}
    for rows in (1, 8):
        for setting, values in step_times(engines, rows, args.steps).items():
            median = statistics.median(values)
            speed.setdefault(setting, {})[f"batch{rows}"] = {
                "step_ms": round(median, 1),
                "fastest_step_ms": round(min(values), 1),
                "tokens_per_s": round(rows * 1000 / median, 1),
            }
    print(
        json.dumps(
            {
                "model": "bundled SmolLM2-135M-Instruct",
                "threads": 1,
                "torch": torch.__version__,
                **machine(),
                "prompts": len(QUALITY_PROMPTS),
                "new_tokens": args.new_tokens,
                "quality": quality,
                "speed": speed,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
