"""Running rows through the engine to the end, and Hugging Face's greedy answer to compare with."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
)

from worker.engine.engine import Engine
from worker.engine.rows import RowOutput, RowRequest

PROMPTS = [
    "Hello",
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a very curious little robot",
    "a b c",
    "def fibonacci(n):\n    return",
]


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    outputs: list[RowOutput] = field(default_factory=list)


def collect(outputs: list[RowOutput], into: dict[Hashable, Completion]) -> None:
    for output in outputs:
        completion = into.setdefault(output.key, Completion())
        assert completion.finish_reason is None, "a finished row reported again"
        if output.token_id is not None:
            completion.tokens.append(output.token_id)
        completion.text += output.text
        completion.finish_reason = output.finish_reason
        completion.outputs.append(output)


def run(engine: Engine, rows: list[RowRequest]) -> dict[Hashable, Completion]:
    engine.add(rows)
    completions: dict[Hashable, Completion] = {}
    while engine.has_work:
        collect(engine.step(), completions)
        if engine._batch is not None:  # the host's row lengths (attention groups) match the mask
            assert engine._batch.lengths == engine._batch.attention_mask.sum(dim=1).tolist()
    return completions


def run_with_joins(
    engine: Engine, rows: list[RowRequest], join: dict[int, list[RowRequest]] | None = None
) -> dict[Hashable, Completion]:
    """Every row's completion; `join` rows come in at those steps (in the step's own
    forward where the engine can, else added)."""
    join = dict(join or {})
    completions: dict[Hashable, Completion] = {}
    if rows:
        engine.add(rows)
    step = 0
    while engine.has_work or join:
        newcomers = join.pop(step, [])
        in_step = bool(newcomers) and engine.has_work and engine.can_join(newcomers)
        if newcomers and not in_step:
            engine.add(newcomers)
        collect(engine.step(joining=newcomers if in_step else ()), completions)
        step += 1
    return completions


def hf_greedy(model: PreTrainedModel, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """`generate` on the prompt alone, no padding."""
    input_ids = torch.tensor([prompt_ids])
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        **kwargs,
    )
    return output[0, len(prompt_ids) :].tolist()


def llama(model_dir: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny Llama from disk, ready for inference, in `dtype`."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def windows_used(monkeypatch) -> list[bool]:
    """Records, decode step by decode step, whether the engine split its rows' attention into
    windows (worker.engine.attention.plan_windows found something to save)."""
    from worker.engine.attention import plan_windows

    used: list[bool] = []

    def spy(lengths, width):
        windows = plan_windows(lengths, width)
        used.append(windows is not None)
        return windows

    monkeypatch.setattr("worker.engine.engine.plan_windows", spy)
    return used
