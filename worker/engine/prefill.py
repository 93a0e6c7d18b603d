"""Where a prompt's prefill starts and in which chunks it runs.

A prompt's first tokens may come from the prefix cache (worker.engine.prefix_cache):
whole blocks, at least one token left to compute. In the batch-invariant mode the
rest runs in chunks that end at multiples of the block size, counted from the
prompt's first token, whether or not a prefix was cached: each chunk then computes
the same keys and values, bit for bit, alone or after a cache hit, because its tokens
see the same tokens in a forward of the same shape (torch's CPU attention and
oneDNN's products round otherwise for other shapes). Outside that mode the rest runs
in one forward.

Easy to get wrong: a hit or a chunk may end inside an image's tokens. Each chunk is
given the features of its own image tokens, and, where image tokens attend to each
other both ways (Gemma 3), the token types of every token up to its end, cached ones
included, since the model's mask reads them by position (worker.engine.vision)."""

from __future__ import annotations

import itertools

Span = tuple[int, int]  # tokens [start, end)


def cached_blocks_allowed(length: int, block_tokens: int, available: int) -> int:
    """How many of the `available` cached blocks a `length`-token prompt may start
    from: at least one token is left to compute (its logits are the first sample's)."""
    return min(available, (length - 1) // block_tokens)


def chunks(start: int, length: int, chunk_tokens: int | None) -> list[Span]:
    """The forwards that prefill tokens [start, length): one, or (`chunk_tokens`) split
    at the multiples of `chunk_tokens`."""
    if start >= length:
        raise ValueError("nothing to prefill")
    if chunk_tokens is None:
        return [(start, length)]
    first = (start // chunk_tokens + 1) * chunk_tokens
    bounds = [start, *range(first, length, chunk_tokens), length]
    return list(itertools.pairwise(bounds))
