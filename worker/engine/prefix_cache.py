"""Keys and values of recent prompt prefixes, kept in blocks so that a prompt
sharing a prefix with an earlier one prefills only the rest.

A prompt's full blocks of `block_tokens` tokens are named by a hash chain
(`block_keys`): each block's key hashes the previous block's key, the block's token
ids, and, from the block holding the prompt's first image token on, the content ids
of the prompt's images. Image placeholder tokens are the same for every image, so two
prompts about different images never share a block from there on; the same images in
another request do. The chain starts from a namespace that names what else shapes
the keys and values (the LoRA adapter). A block's value is its keys and values on
every layer (`Block`); `PrefixCache` keeps them under a byte bound, least recently
used dropped first, never a block a prefill is reading (`PrefixHit` pins them).

Easy to get wrong: a lookup touches a hit's blocks last to first, so a chain's first
blocks are the most recently used and its tail is dropped before them (a block whose
parent is gone can never be reached again)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

BlockKey = bytes
LayerStates = tuple[torch.Tensor, torch.Tensor]  # one layer's keys and values, [heads, tokens, head_dim]


def block_keys(
    prompt_ids: Sequence[int],
    block_tokens: int,
    *,
    namespace: Hashable = None,
    image_token_id: int | None = None,
    image_ids: Sequence[str] | None = None,
) -> list[BlockKey]:
    """The keys of the prompt's full blocks, in order. Blocks from the one holding the
    first `image_token_id` on are keyed by `image_ids` too; without `image_ids` such
    blocks have no key (the list stops before them: they are never cached)."""
    first_image = _first_index(prompt_ids, image_token_id)
    images = "\x1f".join(image_ids).encode() if image_ids is not None else None
    keys: list[BlockKey] = []
    previous = hashlib.blake2b(repr(namespace).encode(), digest_size=16).digest()
    for start in range(0, len(prompt_ids) - block_tokens + 1, block_tokens):
        end = start + block_tokens
        digest = hashlib.blake2b(previous, digest_size=16)
        digest.update(b",".join(str(token).encode() for token in prompt_ids[start:end]))
        if first_image is not None and first_image < end:
            if images is None:
                break
            digest.update(b"\x1eimages\x1e" + images)
        previous = digest.digest()
        keys.append(previous)
    return keys


def _first_index(prompt_ids: Sequence[int], token: int | None) -> int | None:
    if token is None:
        return None
    return next((index for index, value in enumerate(prompt_ids) if value == token), None)


@dataclass(eq=False)
class Block:
    """One block's keys and values on every layer of the model."""

    layers: tuple[LayerStates, ...]
    nbytes: int = 0
    pins: int = 0

    def __post_init__(self) -> None:
        self.nbytes = sum(keys.nbytes + values.nbytes for keys, values in self.layers)


@dataclass(eq=False)
class PrefixHit:
    """The cached blocks a prompt starts with, pinned until `PrefixCache.release`."""

    blocks: list[Block]
    block_tokens: int
    released: bool = False

    @property
    def tokens(self) -> int:
        return len(self.blocks) * self.block_tokens

    def layer_states(self) -> list[LayerStates]:
        """Each layer's keys and values over the hit's tokens, [1, heads, tokens, head_dim]."""
        layers = len(self.blocks[0].layers)
        return [
            tuple(
                torch.cat([block.layers[layer][part] for block in self.blocks], dim=1)[None]
                for part in (0, 1)
            )
            for layer in range(layers)
        ]


@dataclass
class CacheCounters:
    """What the cache has done since it was made (exported as metrics by the worker)."""

    hit_tokens: int = 0
    missed_tokens: int = 0
    evicted_blocks: int = 0
    stored_blocks: int = 0
    refused_blocks: int = 0  # did not fit: larger than the bound, or every block pinned


@dataclass
class PrefixCache:
    """Blocks of prompt prefixes' keys and values, at most `max_bytes` of them."""

    max_bytes: int
    block_tokens: int
    bytes: int = 0
    counters: CacheCounters = field(default_factory=CacheCounters)
    _blocks: OrderedDict[BlockKey, Block] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        if self.block_tokens < 1:
            raise ValueError("block_tokens must be at least 1")
        if self.max_bytes < 0:
            raise ValueError("max_bytes must not be negative")

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._blocks

    def cached_blocks(self, keys: Sequence[BlockKey], limit: int | None = None) -> int:
        """How many of `keys`' first blocks are cached (at most `limit`), changing nothing."""
        count = 0
        for key in keys[:limit]:
            if key not in self._blocks:
                break
            count += 1
        return count

    def lookup(self, keys: Sequence[BlockKey], limit: int | None = None) -> PrefixHit | None:
        """The longest cached run of `keys`' first blocks (at most `limit`), pinned and
        marked recently used; None when the first block is not cached."""
        count = self.cached_blocks(keys, limit)
        if count == 0:
            return None
        blocks = [self._blocks[key] for key in keys[:count]]
        for key in reversed(keys[:count]):  # the chain's first block ends up the most recent
            self._blocks.move_to_end(key)
        for block in blocks:
            block.pins += 1
        return PrefixHit(blocks, self.block_tokens)

    def release(self, hit: PrefixHit | None) -> None:
        """Unpin a hit's blocks (once; later calls do nothing)."""
        if hit is None or hit.released:
            return
        hit.released = True
        for block in hit.blocks:
            block.pins -= 1

    def count(self, hit_tokens: int, missed_tokens: int) -> None:
        """Record a prefill's prompt tokens read from the cache and computed."""
        self.counters.hit_tokens += hit_tokens
        self.counters.missed_tokens += missed_tokens

    def store(self, key: BlockKey, layers: Sequence[LayerStates]) -> bool:
        """Keep a block under `key` (its states are copied), dropping least recently used
        unpinned blocks to make room; whether it is cached now."""
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return True
        block = Block(tuple((keys.clone(), values.clone()) for keys, values in layers))
        if not self._make_room(block.nbytes):
            self.counters.refused_blocks += 1
            return False
        self._blocks[key] = block
        self.bytes += block.nbytes
        self.counters.stored_blocks += 1
        return True

    def _make_room(self, nbytes: int) -> bool:
        if nbytes > self.max_bytes:
            return False
        if self.bytes + nbytes <= self.max_bytes:
            return True
        unpinned = [key for key, block in self._blocks.items() if block.pins == 0]  # least recent first
        for key in unpinned:
            if self.bytes + nbytes <= self.max_bytes:
                break
            dropped = self._blocks.pop(key)
            self.bytes -= dropped.nbytes
            self.counters.evicted_blocks += 1
        return self.bytes + nbytes <= self.max_bytes

    def clear(self) -> None:
        """Drop every unpinned block (e.g. when an adapter's weights change)."""
        for key in [key for key, block in self._blocks.items() if block.pins == 0]:
            self.bytes -= self._blocks.pop(key).nbytes
