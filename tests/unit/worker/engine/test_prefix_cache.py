"""The prefix cache's parts without a model: block keys (token ids and the images they
stand for), longest-prefix lookups, the byte bound and what eviction spares, and where a
prefill may start and split (worker.engine.prefix_cache, worker.engine.prefill)."""

from __future__ import annotations

import pytest
import torch

from worker.engine.prefill import cached_blocks_allowed, chunks
from worker.engine.prefix_cache import PrefixCache, block_keys

IMAGE = 99


def states(fill: float, layers: int = 2, tokens: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A block's keys and values on each layer: 2 heads, `tokens` tokens, 8 dims (64 bytes a tensor)."""
    value = float(fill)
    return [(torch.full((2, tokens, 8), value), torch.full((2, tokens, 8), -value)) for _ in range(layers)]


BLOCK_BYTES = 2 * 2 * (2 * 4 * 8 * 4)  # layers x (keys, values) x float32 tensor


# -- keys ---------------------------------------------------------------------------


def test_only_full_blocks_get_keys_and_each_key_depends_on_all_tokens_before_it():
    keys = block_keys(list(range(10)), 4)
    assert len(keys) == 2
    other = block_keys([7, 1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    # the second blocks' tokens are equal, yet their keys differ: the chain does
    assert keys[0] != other[0] and keys[1] != other[1]
    assert block_keys(list(range(10)), 4) == keys


def test_different_images_behind_equal_placeholder_tokens_never_share_a_block():
    prompt = [1, 2, 3, 4, IMAGE, IMAGE, IMAGE, IMAGE, 5, 6, 7, 8]
    red = block_keys(prompt, 4, image_token_id=IMAGE, image_ids=["red"])
    blue = block_keys(prompt, 4, image_token_id=IMAGE, image_ids=["blue"])
    assert red[0] == blue[0]  # the text before the first image is shared
    assert red[1] != blue[1] and red[2] != blue[2]
    assert block_keys(prompt, 4, image_token_id=IMAGE, image_ids=["red"]) == red  # the same image again


def test_blocks_of_images_without_content_ids_get_no_keys():
    prompt = [1, 2, 3, 4, 5, IMAGE, IMAGE, IMAGE, 5, 6, 7, 8]
    assert len(block_keys(prompt, 4, image_token_id=IMAGE, image_ids=None)) == 1


def test_a_namespace_keeps_an_adapters_blocks_apart_from_the_base_models():
    prompt = list(range(8))
    assert block_keys(prompt, 4) != block_keys(prompt, 4, namespace=("lora", "alpha", 1))
    assert block_keys(prompt, 4, namespace=("lora", "alpha", 1)) != block_keys(
        prompt, 4, namespace=("lora", "alpha", 2)
    )


# -- lookups and the byte bound -------------------------------------------------------


def test_lookup_finds_the_longest_cached_run_of_first_blocks():
    cache = PrefixCache(max_bytes=10 * BLOCK_BYTES, block_tokens=4)
    keys = block_keys(list(range(16)), 4)
    for index in (0, 1, 3):
        cache.store(keys[index], states(index))
    hit = cache.lookup(keys)
    assert hit is not None and hit.tokens == 8
    layer_keys, layer_values = hit.layer_states()[1]
    assert layer_keys.shape == (1, 2, 8, 8)
    assert layer_keys[0, :, :4].eq(0).all() and layer_keys[0, :, 4:].eq(1).all()
    assert layer_values[0, :, 4:].eq(-1).all()
    assert cache.lookup(keys, limit=1).tokens == 4
    assert cache.lookup(keys[2:]) is None  # a run starts at the first block asked for


def test_least_recently_used_blocks_go_first_and_the_byte_bound_holds():
    cache = PrefixCache(max_bytes=3 * BLOCK_BYTES, block_tokens=4)
    keys = [block_keys([n] * 4, 4)[0] for n in range(5)]
    for index in range(3):
        cache.store(keys[index], states(index))
    cache.release(cache.lookup([keys[0]]))  # used: now the most recent
    cache.store(keys[3], states(3))
    assert keys[1] not in cache and all(k in cache for k in (keys[0], keys[2], keys[3]))
    assert cache.bytes == 3 * BLOCK_BYTES and cache.counters.evicted_blocks == 1


def test_blocks_in_use_are_never_dropped():
    cache = PrefixCache(max_bytes=2 * BLOCK_BYTES, block_tokens=4)
    keys = block_keys(list(range(8)), 4)
    cache.store(keys[0], states(0))
    cache.store(keys[1], states(1))
    hit = cache.lookup(keys)
    other = block_keys([5] * 4, 4)[0]
    assert not cache.store(other, states(5))  # no room: every block is pinned
    assert keys[0] in cache and keys[1] in cache and cache.counters.refused_blocks == 1
    cache.release(hit)
    cache.release(hit)  # a second release changes nothing
    assert cache.store(other, states(5))
    assert cache.bytes <= cache.max_bytes


def test_a_chains_tail_is_dropped_before_its_head():
    cache = PrefixCache(max_bytes=3 * BLOCK_BYTES, block_tokens=4)
    keys = block_keys(list(range(12)), 4)
    for index, key in enumerate(keys):
        cache.store(key, states(index))
    cache.release(cache.lookup(keys))
    cache.store(block_keys([7] * 4, 4)[0], states(7))
    assert keys[0] in cache and keys[1] in cache and keys[2] not in cache


def test_a_block_larger_than_the_bound_is_not_kept():
    cache = PrefixCache(max_bytes=BLOCK_BYTES - 1, block_tokens=4)
    assert not cache.store(block_keys(list(range(4)), 4)[0], states(0))
    assert len(cache) == 0 and cache.bytes == 0


def test_stored_states_are_copies():
    cache = PrefixCache(max_bytes=10 * BLOCK_BYTES, block_tokens=4)
    key = block_keys(list(range(4)), 4)[0]
    layers = states(1.0)
    cache.store(key, layers)
    layers[0][0].fill_(5.0)
    assert cache.lookup([key]).layer_states()[0][0].eq(1.0).all()


# -- where a prefill starts and splits ------------------------------------------------


def test_a_hit_leaves_at_least_one_token_to_compute():
    assert cached_blocks_allowed(length=12, block_tokens=4, available=3) == 2
    assert cached_blocks_allowed(length=13, block_tokens=4, available=3) == 3
    assert cached_blocks_allowed(length=4, block_tokens=4, available=1) == 0


@pytest.mark.parametrize(
    ("start", "length", "size", "expected"),
    [
        (0, 10, None, [(0, 10)]),
        (0, 10, 4, [(0, 4), (4, 8), (8, 10)]),
        (4, 10, 4, [(4, 8), (8, 10)]),
        (0, 8, 4, [(0, 4), (4, 8)]),
        (8, 9, 4, [(8, 9)]),
    ],
)
def test_chunks_end_at_multiples_of_the_block_size(start, length, size, expected):
    assert chunks(start, length, size) == expected
