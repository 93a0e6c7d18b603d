"""GrowingLayer holds what transformers' DynamicLayer holds, without copying
its cache on every append; the engine over it still equals `generate`."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from tests.unit.engine.test_engine import hf_greedy, run
from worker.engine.engine import Engine
from worker.engine.kv_cache import MIN_HEADROOM_TOKENS, GrowingLayer, growing_cache
from worker.engine.rows import GenerationParams, RowRequest


def states(batch: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, 2, tokens, 4)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def test_appends_hold_what_dynamic_layer_holds_and_reuse_the_buffer():
    growing, plain = GrowingLayer(), DynamicLayer()
    buffers = set()
    for step, tokens in enumerate([7] + [1] * (2 * MIN_HEADROOM_TOKENS)):
        keys, values = states(3, tokens, step)
        got = growing.update(keys, values)
        expected = plain.update(keys, values)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert growing.get_seq_length() == plain.get_seq_length()
        buffers.add(growing.keys.data_ptr())
    # one buffer per headroom's worth of tokens, not one per step
    assert len(buffers) <= 3


def test_keys_replaced_from_outside_are_the_new_starting_point():
    growing, plain = GrowingLayer(), DynamicLayer()
    for layer in (growing, plain):
        layer.update(*states(3, 5, 0))
        layer.update(*states(3, 1, 1))
    keep = torch.tensor([2, 0])
    for layer in (growing, plain):  # what Batch.filter does: select rows, trim left padding
        layer.batch_select_indices(keep)
        layer.keys, layer.values = layer.keys[:, :, 2:], layer.values[:, :, 2:]
    for step in range(3):
        got, expected = growing.update(*states(2, 1, 10 + step)), plain.update(*states(2, 1, 10 + step))
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_the_engine_cache_grows_in_place(tiny_model, tokenizer):
    cache = growing_cache(tiny_model.config)
    assert cache.layers and all(type(layer) is GrowingLayer for layer in cache.layers)


def test_long_generations_past_several_reallocations_equal_generate(tiny_model, tokenizer):
    engine = Engine(tiny_model, tokenizer)
    tokens = 3 * MIN_HEADROOM_TOKENS
    params = GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens)
    prompts = ["Hello there", "The capital of France is a city"]
    rows = [
        RowRequest(key=i, prompt_ids=engine.encode_prompt(prompt), params=params)
        for i, prompt in enumerate(prompts)
    ]
    completions = run(engine, rows)
    for row in rows:
        expected = hf_greedy(tiny_model, row.prompt_ids, tokens, min_new_tokens=tokens)
        assert completions[row.key].tokens == expected
