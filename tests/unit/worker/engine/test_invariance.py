"""Batch invariance in bfloat16, the default dtype: a row's tokens equal its solo tokens
whatever the batch it runs in, when it joins, and how it is prefilled (random trials on
a 2-layer Llama with the bundled model's layer shapes, loaded as a worker serves it:
fused layers, packed weights)."""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterator

import pytest
import torch
from torch import nn

from shared.settings import WorkerSettings
from worker.engine.engine import Engine
from worker.engine.invariance import SingleRowPadded, pad_single_rows
from worker.engine.rows import GenerationParams, RowRequest

TRIALS = 4
WORDS = ["the", "a", "of", "robot", "river", "quiet", "seven", "blue", "market", "under", "sings", "when"]


def prompts(rng: random.Random, count: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))) for _ in range(count)]


def requests(engine: Engine, texts: list[str], params: list[GenerationParams]) -> list[RowRequest]:
    return [
        RowRequest(key=i, prompt_ids=engine.encode_prompt(text), params=p)
        for i, (text, p) in enumerate(zip(texts, params, strict=True))
    ]


def params_for(rng: random.Random, count: int, sampled: bool) -> list[GenerationParams]:
    if not sampled:
        return [GenerationParams(max_new_tokens=rng.randint(4, 24)) for _ in range(count)]
    return [
        GenerationParams(max_new_tokens=rng.randint(4, 24), temperature=0.9, top_k=0, seed=rng.randint(0, 99))
        for _ in range(count)
    ]


def solo(engine: Engine, rows: list[RowRequest]) -> dict[Hashable, list[int]]:
    return {row.key: drain(engine, [row])[row.key] for row in rows}


def drain(engine: Engine, rows: list[RowRequest], join: dict[int, list[RowRequest]] | None = None):
    """Run `rows` (added at once) and the rows of `join` (added at those steps, by `add` or,
    where the engine can, in the step's own forward) to the end; every row's tokens."""
    join = dict(join or {})
    tokens: dict[Hashable, list[int]] = {}
    if rows:
        engine.add(rows)
    step = 0
    while engine.has_work or join:
        newcomers = join.pop(step, [])
        in_step = newcomers and engine.has_work and engine.can_join(newcomers) and step % 2 == 0
        if newcomers and not in_step:
            engine.add(newcomers)
        for output in engine.step(joining=newcomers if in_step else ()):
            if output.token_id is not None:
                tokens.setdefault(output.key, []).append(output.token_id)
        step += 1
    return tokens


def trials(sampled: bool) -> Iterator[tuple[random.Random, list[str], list[GenerationParams]]]:
    for trial in range(TRIALS):
        rng = random.Random(1000 * sampled + trial)
        count = rng.randint(2, 8)
        yield rng, prompts(rng, count), params_for(rng, count, sampled)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded sampling"])
def test_rows_answer_as_alone_in_any_batch_and_at_any_join_step(served, sampled):
    engine = Engine(served.model, served.tokenizer)
    assert engine.invariance is not None and engine.invariance.covered, engine.invariance
    for rng, texts, params in trials(sampled):
        rows = requests(engine, texts, params)
        alone = solo(engine, rows)
        assert drain(engine, rows) == alone  # all together, prefilled in one add
        steps = sorted(rng.randint(0, 12) for _ in rows)
        joining: dict[int, list[RowRequest]] = {}
        for step, row in zip(steps, rows, strict=True):
            joining.setdefault(step, []).append(row)
        assert drain(engine, [], joining) == alone  # joining a running batch at random steps


def test_without_the_mode_the_same_trials_depend_on_the_batch(served):
    """The trials above are sensitive: with today's fastest path some row changes."""
    engine = Engine(served.model, served.tokenizer, batch_invariant=False)
    differing = 0
    for _, texts, params in trials(False):
        rows = requests(engine, texts, params)
        alone = solo(engine, rows)
        together = drain(engine, rows)
        differing += sum(together[key] != tokens for key, tokens in alone.items())
    assert differing > 0
    Engine(served.model, served.tokenizer)  # leave the shared model invariant again


def test_a_linear_shape_whose_one_row_products_round_otherwise_is_padded():
    """Where this machine's bfloat16 kernels round a one-row product otherwise than a batch's
    (oneDNN with AVX512-BF16 does for the bundled model's down_proj shape), the layer is padded;
    where they agree (CPUs without it), padding is not needed. Either way a row alone answers
    as it does in a batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(576, 576), nn.Linear(1536, 576)).to(torch.bfloat16)
    rows = torch.randn(8, 1536, dtype=torch.bfloat16).relu()  # activations after a gate, as down_proj sees
    with torch.inference_mode():
        unpadded = model[1](rows)
        differs = not all(torch.equal(model[1](rows[i : i + 1]), unpadded[i : i + 1]) for i in range(8))
    coverage = pad_single_rows(model)
    assert coverage.covered
    if differs:
        assert isinstance(model[1], SingleRowPadded)  # as the bundled model's down_proj
    assert coverage.padded_shapes == [
        f"{layer.linear.in_features}x576 bfloat16" for layer in model if isinstance(layer, SingleRowPadded)
    ]
    with torch.inference_mode():
        batched = model[1](rows)
        assert all(torch.equal(model[1](rows[i : i + 1]), batched[i : i + 1]) for i in range(8))


def test_float32_linear_products_are_reported_not_covered():
    model = nn.Sequential(nn.Linear(256, 256))
    coverage = pad_single_rows(model)
    if coverage.covered:  # the machine's float32 kernels happen to agree across row counts
        pytest.skip("float32 products agree across row counts on this machine")
    assert "changes with the number of rows" in coverage.describe()


def test_the_worker_reports_what_the_mode_covers(smollm2_shaped_model_dir):
    from worker import main as worker_main

    def facts(**flags) -> dict:
        settings = WorkerSettings(redis_url="x", model=str(smollm2_shaped_model_dir), **flags)
        loaded = worker_main.load_for_serving(settings)
        engine = worker_main.build_engine(settings, loaded, worker_main.lora_catalog(settings))
        return worker_main.serving_facts(settings, loaded, engine)

    on = facts(dtype="bfloat16")
    assert on["batch_invariant"] is True and on["batch_invariance"] == "batch invariant"
    off = facts(dtype="bfloat16", batch_invariant="off")
    assert off["batch_invariant"] is False and off["batch_invariance"] == "off"
    quantized = facts(quantize="int8")
    assert quantized["batch_invariant"] is False
    assert "quantized layers" in quantized["batch_invariance"]


def test_lora_workers_say_they_are_not_covered_and_keep_their_layers(
    tiny_model_dir, tiny_lora_dir, tokenizer
):
    from transformers import AutoModelForCausalLM

    from worker.engine.adapters import AdapterCatalog, LoraAdapters

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    engine = Engine(base, tokenizer, adapters=LoraAdapters(base, AdapterCatalog(directory=tiny_lora_dir)))
    assert engine.invariance is not None and not engine.invariance.covered
    assert "LoRA" in engine.invariance.describe()
    assert not any(isinstance(module, SingleRowPadded) for module in base.modules())
