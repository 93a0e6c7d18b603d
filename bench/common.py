"""What the benches share: the prompts, the flags they spell alike, the model as a worker
loads it, the report's figures (percentiles, stream summaries, where it ran) and the
merging of repeated runs.

Heavy imports (torch, the worker) happen inside the functions, so `--help` stays quick."""

from __future__ import annotations

import argparse
import os
import platform
import statistics

BUNDLED_MODEL = "SmolLM2-135M-Instruct (bundled)"

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
    """`count` prompts, cycling through PROMPTS."""
    return [PROMPTS[i % len(PROMPTS)] for i in range(count)]


# -- flags ---------------------------------------------------------------------


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """The bench's argument parser, described by its docstring's first paragraph."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0])


def add_model_flags(
    parser: argparse.ArgumentParser,
    *,
    dtype: str = "auto",
    pack_weights: bool = True,
    threads_help: str = "torch threads (default: what `mmserve serve` gives one worker)",
) -> None:
    """--dtype, --threads and (unless `pack_weights` is false) --pack-weights, as mmserve spells them."""
    parser.add_argument("--dtype", default=dtype, help="mmserve's --dtype")
    if pack_weights:
        parser.add_argument(
            "--pack-weights", default="auto", choices=["auto", "off"], help="mmserve's --pack-weights"
        )
    parser.add_argument("--threads", type=int, default=None, help=threads_help)


def threads_or_default(threads: int | None) -> int:
    """--threads, or what `mmserve serve` gives its one worker on this machine."""
    from worker.main import default_threads

    return threads or default_threads(1)


# -- the model -----------------------------------------------------------------


def served_model(catalog=None, **settings):
    """The model as a worker serves it (`load_for_serving`: fused, quantized, packed as
    WorkerSettings(**settings) says), serving the LoRA adapters of `catalog` if given."""
    from shared.settings import WorkerSettings
    from worker.main import load_for_serving

    return load_for_serving(WorkerSettings(redis_url="", **settings), catalog)


def engine_for(loaded, adapters=None, batch_invariant: bool = True, close_in_time: bool = True):
    """An Engine over a loaded model, on its device (batch invariant and closing constrained
    answers in time, as workers run by default)."""
    from worker.engine.engine import Engine

    return Engine(
        loaded.model,
        loaded.tokenizer,
        device=loaded.device,
        adapters=adapters,
        batch_invariant=batch_invariant,
        close_in_time=close_in_time,
    )


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """`text` as one user turn in the tokenizer's chat template, ready for the answer: token ids."""
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )


def dtype_name(dtype) -> str:
    """A torch dtype as the reports write it: "bfloat16", not "torch.bfloat16"."""
    return str(dtype).removeprefix("torch.")


# -- the report ----------------------------------------------------------------


def machine() -> dict:
    """The report's fields saying where it ran."""
    return {"cpu_count": os.cpu_count(), "machine": platform.machine()}


def served_facts(args) -> dict:
    """The report's fields saying how the bundled model was served (add_model_flags' flags, resolved
    threads, and --max-batch-size) and where."""
    return {
        "model": BUNDLED_MODEL,
        "dtype": args.dtype,
        "pack_weights": args.pack_weights,
        "threads": args.threads,
        "max_batch_size": args.max_batch_size,
        **machine(),
    }


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def stream_summary(tokens: int, seconds: float, ttfts: list[float], **first) -> dict:
    """`first`'s fields, then tokens, seconds, tokens/s and time to first token p50 and p95."""
    return {
        **first,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2),
        "ttft_p50_s": round(percentile(ttfts, 50), 3),
        "ttft_p95_s": round(percentile(ttfts, 95), 3),
    }


def median_of(values: list, digits: int = 3):
    """Repeated runs' figures merged (`--repeats`): each number the median over the runs (ratios
    too, so a ratio is the median of the ratios taken within each run), anything else the first run's."""
    first = values[0]
    if isinstance(first, dict):
        return {key: median_of([value.get(key) for value in values], digits) for key in first}
    numbers = [value for value in values if isinstance(value, int | float) and not isinstance(value, bool)]
    if len(numbers) == len(values):
        return round(statistics.median(numbers), digits)
    return first
