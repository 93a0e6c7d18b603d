"""GrowingLayer holds what transformers' DynamicLayer holds, without copying
its cache on every append, when rows leave or when batches merge; sliding-window
layers merge and shrink in line with the mask; the engine over it still equals
`generate`."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from tests.support.engine_runs import hf_greedy, run
from worker.engine.engine import Engine
from worker.engine.kv_cache import (
    MIN_HEADROOM_TOKENS,
    GrowingLayer,
    growing_cache,
    merge_caches,
    select_rows,
)
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


def filled(batch: int, tokens: int, seed: int) -> tuple[GrowingLayer, DynamicLayer]:
    growing, plain = GrowingLayer(), DynamicLayer()
    for layer in (growing, plain):
        layer.update(*states(batch, tokens, seed))
        layer.update(*states(batch, 1, seed + 1))
    return growing, plain


def same(growing: GrowingLayer, plain: DynamicLayer) -> bool:
    return torch.equal(growing.keys, plain.keys) and torch.equal(growing.values, plain.values)


def test_rows_leave_within_the_buffer_and_only_rows_behind_the_first_gap_move():
    growing, plain = filled(5, 6, 0)
    buffer = growing._key_buffer.data_ptr()
    front_row = growing.keys[0].clone()
    growing.keep_rows([0, 2, 4], drop_left=2)
    plain.keys, plain.values = plain.keys[[0, 2, 4], :, 2:], plain.values[[0, 2, 4], :, 2:]
    assert same(growing, plain)
    assert torch.equal(growing.keys[0], front_row[:, 2:])
    for step in range(3):  # appends still go into the same buffer
        got = growing.update(*states(3, 1, 20 + step))
        expected = plain.update(*states(3, 1, 20 + step))
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert growing._key_buffer.data_ptr() == buffer


def test_rows_kept_out_of_order_are_selected_by_copy():
    growing, plain = filled(3, 4, 0)
    growing.keep_rows([2, 0], drop_left=1)
    plain.keys, plain.values = plain.keys[[2, 0], :, 1:], plain.values[[2, 0], :, 1:]
    assert same(growing, plain)
    got, expected = growing.update(*states(2, 1, 9)), plain.update(*states(2, 1, 9))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_merged_layers_are_left_padded_with_zeros_and_have_room_to_grow():
    long, long_plain = filled(2, 7, 0)
    short, short_plain = filled(3, 2, 5)
    merged = GrowingLayer.merged([long, short], width=8, order=range(5))
    pad = torch.zeros(3, 2, 5, 4)
    expected_keys = torch.cat([long_plain.keys, torch.cat([pad, short_plain.keys], dim=2)])
    expected_values = torch.cat([long_plain.values, torch.cat([pad, short_plain.values], dim=2)])
    assert torch.equal(merged.keys, expected_keys) and torch.equal(merged.values, expected_values)
    buffer = merged._key_buffer.data_ptr()
    merged.update(*states(5, 1, 30))
    assert merged._key_buffer.data_ptr() == buffer and merged.get_seq_length() == 9


def test_merged_rows_come_in_the_order_asked_for():
    long, long_plain = filled(2, 7, 0)
    short, short_plain = filled(3, 2, 5)
    order = [2, 0, 3, 4, 1]  # rows numbered across the layers: 0-1 long, 2-4 short
    merged = GrowingLayer.merged([long, short], width=8, order=order)
    pad = torch.zeros(3, 2, 5, 4)
    rows = torch.cat([long_plain.values, torch.cat([pad, short_plain.values], dim=2)])
    assert torch.equal(merged.values, rows[order])


def test_cache_level_select_and_merge_cover_every_layer(tiny_model):
    caches = []
    for rows, tokens in ((2, 6), (1, 3)):
        cache = growing_cache(tiny_model.config)
        for index, layer in enumerate(cache.layers):
            layer.update(*states(rows, tokens, index))
        caches.append(cache)
    merged = merge_caches(caches, width=6, order=[0, 1, 2])
    assert all(layer.keys.shape == (3, 2, 6, 4) for layer in merged.layers)
    select_rows(merged, [1, 2], drop_left=2)
    assert all(layer.keys.shape == (2, 2, 4, 4) for layer in merged.layers)
    assert all(torch.equal(layer.keys[1, :, :1], torch.zeros(2, 1, 4)) for layer in merged.layers)


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


def window_layer(batch: int, tokens: int, seed: int, window: int = 4) -> DynamicSlidingWindowLayer:
    layer = DynamicSlidingWindowLayer(window)
    layer.update(*states(batch, tokens, seed))
    return layer


def test_merged_sliding_windows_stay_right_aligned_with_the_mask():
    short, long = window_layer(1, 2, 0), window_layer(2, 6, 1)  # windows of 2 and 3 columns
    cache = DynamicCache()
    cache.layers = [short]
    other = DynamicCache()
    other.layers = [long]
    (merged,) = merge_caches([cache, other], width=6, order=[1, 0, 2]).layers
    assert isinstance(merged, DynamicSlidingWindowLayer)
    assert merged.cumulative_length == 6 and merged.keys.shape[-2] == 3
    assert torch.equal(merged.keys[0], long.keys[0]) and torch.equal(merged.keys[2], long.keys[1])
    assert torch.equal(merged.keys[1, :, 1:], short.keys[0]) and not merged.keys[1, :, 0].any()
    assert torch.equal(merged.values[1, :, 1:], short.values[0])


def test_sliding_windows_shrink_with_the_mask_when_rows_leave():
    layer = window_layer(3, 5, 0, window=8)  # the whole 5 columns fit in the window
    cache = DynamicCache()
    cache.layers = [layer]
    before = layer.keys.clone()
    select_rows(cache, [2, 0], drop_left=2)
    (kept,) = cache.layers
    assert kept.cumulative_length == 3
    assert torch.equal(kept.keys, before[[2, 0], :, 2:])


def right_aligned(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Rows of [heads, tokens, dim] states, left-padded with zeros to `width` tokens."""
    padded = torch.zeros(len(rows), rows[0].shape[0], width, rows[0].shape[-1])
    for index, states in enumerate(rows):
        padded[index, :, width - states.shape[1] :] = states
    return padded


def test_rows_drop_their_last_tokens_and_stay_right_aligned():
    growing = GrowingLayer()
    keys, values = states(3, 9, 0)
    keys[1, :, :2] = values[1, :, :2] = 0  # row 1 is left-padded by two
    growing.update(keys, values)
    added_keys, added_values = states(3, 4, 1)  # a step feeding four tokens a row
    growing.update(added_keys, added_values)
    full_keys, full_values = torch.cat([keys, added_keys], 2), torch.cat([values, added_values], 2)
    buffer = growing.keys.data_ptr()
    dropped = [3, 1, 2]  # row 0 keeps 1 of the 4, row 1 keeps 3, row 2 keeps 2
    growing.drop_last(dropped)
    assert growing.keys.shape[2] == 13 - 1 and growing.keys.data_ptr() == buffer  # in place
    width = growing.keys.shape[2]
    kept = [13 - count for count in dropped]
    for name, full, held in (("keys", full_keys, growing.keys), ("values", full_values, growing.values)):
        expected = right_aligned([full[row, :, : kept[row]] for row in range(3)], width)
        expected[1, :, : width - kept[1] + 2] = 0  # row 1's own padding stays zeros
        assert torch.equal(held, expected), name
    more_keys, more_values = states(3, 1, 2)  # the next step appends after every row's last token
    growing.update(more_keys, more_values)
    assert torch.equal(growing.keys[:, :, -1:], more_keys)
    assert torch.equal(growing.keys[0, :, -3:-1], full_keys[0, :, 8:10])


def test_dropping_from_keys_set_from_outside_copies_them():
    growing = GrowingLayer()
    growing.update(*states(2, 5, 0))
    outside_keys, outside_values = states(2, 6, 1)
    growing.keys, growing.values = outside_keys, outside_values
    kept_keys = outside_keys.clone()
    growing.drop_last([0, 2])
    assert torch.equal(outside_keys, kept_keys)  # the outside tensors are not changed
    assert torch.equal(growing.keys[0], kept_keys[0])
    assert torch.equal(growing.keys[1, :, 2:], kept_keys[1, :, :4]) and not growing.keys[1, :, :2].any()
