"""Decode-step attention that reads each row's own tokens, not its padding.

A running batch is left-padded to its longest row, and on a CPU attention reads every
column at memory speed whatever the mask says. So the engine keeps its rows sorted
longest first (worker.engine.batch) and splits each decode step's rows into a few
contiguous groups (`plan_windows`); attention runs once per group over the last
columns of the cache, which hold every real token of the group's rows. It is torch's
sdpa as transformers calls it, registered under its own name with transformers'
AttentionInterface; every call without windows (prefill, vision towers) is plain sdpa.
In the engine's batch-invariant mode (`aligned_keys`) the groups are instead the rows
whose key counts round up to the same width (worker.engine.invariance).

Easy to get wrong: a row's result equals attention over the whole padded width only
up to float rounding (masked columns add nothing to a softmax)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTENTION_NAME = "mmserve_windowed_sdpa"

# Batch-invariant decode attention (`aligned_keys`) attends each row over a width that is
# a function of its own key count (rounded up to a multiple of this): torch's CPU kernel
# splits the key columns into blocks counted from the first, so a row's keys must sit at
# the same offsets, alone and in any batch (see worker.engine.invariance).
ALIGNED_WIDTH_MULTIPLE = 64

# What one more group costs, in row-tokens of attention (one more attention
# call per layer, and its slicing), and the most groups a step is split into.
GROUP_COST_TOKENS = 128
MAX_GROUPS = 4

Windows = tuple[tuple[int, int, int], ...]  # (first row, end row, tokens), rows [first, end)


@dataclass
class AlignedKeys:
    """A decode step's batch-invariant attention (`aligned_keys`): each row's real tokens
    (known on the host) up to the last one the step feeds, and the masks built for them,
    shared by the step's layers."""

    lengths: tuple[int, ...]
    masks: dict[tuple, torch.Tensor] = field(default_factory=dict)
    _earlier: dict[int, AlignedKeys] = field(default_factory=dict)

    def earlier(self, tokens: int) -> AlignedKeys:
        """The same rows `tokens` tokens before (a step feeding several tokens per row:
        its earlier queries see fewer keys), kept for the step's other layers."""
        if tokens == 0:
            return self
        if tokens not in self._earlier:
            self._earlier[tokens] = AlignedKeys(tuple(length - tokens for length in self.lengths))
        return self._earlier[tokens]

    def counts(self, key_width: int) -> list[int]:
        """Each row's keys among `key_width` columns (a sliding-window layer holds fewer)."""
        return [min(length, key_width) for length in self.lengths]

    def mask(self, counts: Sequence[int], columns: int, device: torch.device) -> torch.Tensor:
        """[rows, 1, 1, columns]: True on each row's last `count` columns."""
        wanted = (tuple(counts), columns, device)
        if wanted not in self.masks:
            positions = torch.arange(columns, device=device)
            starts = columns - torch.tensor(list(counts), device=device)
            self.masks[wanted] = (positions[None] >= starts[:, None])[:, None, None, :]
        return self.masks[wanted]


def plan_windows(lengths: Sequence[int], width: int) -> Windows | None:
    """Split rows (with these real lengths, over a cache `width` columns wide)
    into at most MAX_GROUPS contiguous groups, each attending over the last
    `tokens` columns (its longest row's length), so that the columns read plus
    GROUP_COST_TOKENS per group are fewest. None when one group over the whole
    width is best (nothing to save)."""
    count = len(lengths)
    if count == 0:
        return None
    # cost[g][end]: cheapest split of rows [0, end) into g groups; choice[g][end]: its last group's start
    infinity = float("inf")
    cost = [[infinity] * (count + 1) for _ in range(MAX_GROUPS + 1)]
    choice = [[0] * (count + 1) for _ in range(MAX_GROUPS + 1)]
    cost[0][0] = 0
    for groups in range(1, MAX_GROUPS + 1):
        for end in range(1, count + 1):
            longest = 0
            for start in range(end - 1, -1, -1):
                longest = max(longest, lengths[start])
                candidate = cost[groups - 1][start] + (end - start) * longest + GROUP_COST_TOKENS
                if candidate < cost[groups][end]:
                    cost[groups][end], choice[groups][end] = candidate, start
    best = min(range(1, MAX_GROUPS + 1), key=lambda groups: cost[groups][count])
    if cost[best][count] >= count * width + GROUP_COST_TOKENS:
        return None
    windows: list[tuple[int, int, int]] = []
    end = count
    for groups in range(best, 0, -1):
        start = choice[groups][end]
        windows.append((start, end, max(lengths[start:end])))
        end = start
    return tuple(reversed(windows))


def windowed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    row_windows: Windows | None = None,
    aligned_keys: AlignedKeys | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    decode = query.shape[2] == 1 and kwargs.get("position_bias") is None
    if aligned_keys is not None and kwargs.get("position_bias") is None:
        return _aligned_sdpa(module, query, key, value, aligned_keys, kwargs.get("scaling")), None
    if not decode or row_windows is None:
        # prefill, or a model adding a per-position bias (which the groups would have to slice too)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = []
    for first, end, tokens in row_windows:
        mask = attention_mask[first:end, ..., -tokens:] if attention_mask is not None else None
        keys, values = key[first:end, :, -tokens:], value[first:end, :, -tokens:]
        output, _ = sdpa_attention_forward(module, query[first:end], keys, values, mask, **kwargs)
        outputs.append(output)
    return torch.cat(outputs), None


def aligned_width(count: int) -> int:
    """The key columns a row with `count` keys is attended over in the batch-invariant mode."""
    return -(-count // ALIGNED_WIDTH_MULTIPLE) * ALIGNED_WIDTH_MULTIPLE


def _aligned_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    aligned: AlignedKeys,
    scaling: float | None,
) -> torch.Tensor:
    """Attention whose result for a row does not depend on its batch
    (worker.engine.invariance), for rows feeding one token each (a decode step) or
    several (a step checking drafted tokens, worker.engine.speculation). Each query is
    attended as a decode step feeding that token attends it alone: over the keys up to
    its own (the row's later tokens are the cache's last columns, left out), the last
    `aligned_width(count)` columns, its `count` keys at their end. Rows sharing that
    width (neighbours, the rows being sorted by length) go in one call; a width the
    cache does not have yet is made up of zero columns in front.
    [rows, tokens, heads, head_dim], as transformers' sdpa returns."""
    fed, width = query.shape[2], key.shape[2]
    if fed > 1:
        scale = scaling if scaling is not None else getattr(module, "scaling", None)
        at_once = _positions_at_once((query, key, value), aligned, scale)
        if at_once is not None:
            return at_once
    by_position = []
    for position in range(fed):
        later = fed - 1 - position  # the row's tokens after this one, at the end of the cache
        keys, values = key[:, :, : width - later], value[:, :, : width - later]
        earlier = aligned.earlier(later)
        counts = earlier.counts(keys.shape[2])
        outputs, first = [], 0
        while first < len(counts):
            columns = aligned_width(counts[first])
            end = first + 1
            while end < len(counts) and aligned_width(counts[end]) == columns:
                end += 1
            group = slice(first, end)
            mask = earlier.mask(counts[group], columns, key.device)
            queries = query[group, :, position : position + 1]
            outputs.append(_attend_last_columns(module, queries, keys[group], values[group], mask, scaling))
            first = end
        by_position.append(torch.cat(outputs))
    return by_position[0] if fed == 1 else torch.cat(by_position, dim=1)


def _positions_at_once(
    states: tuple[torch.Tensor, torch.Tensor, torch.Tensor], aligned: AlignedKeys, scale: float | None
) -> torch.Tensor | None:
    """`_aligned_sdpa` of rows feeding several tokens, each row's fed tokens in one call:
    each token attends its own window of the row's cache (overlapping views, one column
    apart, no copy), the same columns at the same offsets as one call per token, and
    rounds the same (a 4-dimensional strided view; torch's 5-dimensional path rounds
    otherwise). None when a row's aligned width changes within the step (a token
    crosses a multiple of ALIGNED_WIDTH_MULTIPLE): then one call per token it is."""
    query, key, value = states
    fed, width = query.shape[2], key.shape[2]
    last = aligned.counts(width)
    first_counts = aligned.earlier(fed - 1).counts(width - fed + 1)
    if any(aligned_width(a) != aligned_width(b) for a, b in zip(first_counts, last, strict=True)):
        return None
    rows, key_heads, _, dim = key.shape
    heads = query.shape[1]
    grouped = query.transpose(1, 2).reshape(rows, fed, key_heads, heads // key_heads, dim)
    by_position = [aligned.earlier(fed - 1 - p).counts(width - fed + 1 + p) for p in range(fed)]
    outputs = []
    for row in range(rows):
        columns = aligned_width(last[row])
        start = width - (fed - 1) - columns  # where the first fed token's window starts
        windows = []
        for cached in (key[row], value[row]):  # [key heads, width, dim]
            if start < 0:  # the windows reach before the cache: zero columns in front
                cached = torch.cat([cached.new_zeros((key_heads, -start, dim)), cached], dim=1)
            stride = cached.stride()
            windows.append(
                cached.as_strided(
                    (fed, key_heads, columns, dim),
                    (stride[1], stride[0], stride[1], stride[2]),
                    cached.storage_offset() + max(start, 0) * stride[1],
                )
            )
        counts = [position_counts[row] for position_counts in by_position]
        mask = aligned.mask(counts, columns, key.device)  # [fed, 1, 1, columns]: one row per token
        output = torch.nn.functional.scaled_dot_product_attention(
            grouped[row], *windows, attn_mask=mask, scale=scale
        )
        outputs.append(output.reshape(fed, heads, dim))
    return torch.stack(outputs)


def _attend_last_columns(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """Attention of rows over the last `mask.shape[-1]` columns of their keys (those the
    mask allows). The query heads sharing a key head go in as that head's queries (no
    keys repeated per query head)."""
    rows, key_heads, width, _ = key.shape
    columns = mask.shape[-1]
    if width >= columns:
        key, value = key[:, :, width - columns :], value[:, :, width - columns :]
    else:
        padded_key = key.new_zeros((rows, key_heads, columns, key.shape[3]))
        padded_value = value.new_zeros((rows, key_heads, columns, value.shape[3]))
        padded_key[:, :, columns - width :] = key
        padded_value[:, :, columns - width :] = value
        key, value = padded_key, padded_value
    heads = query.shape[1]
    grouped = query.reshape(rows, key_heads, heads // key_heads, query.shape[3])
    output = torch.nn.functional.scaled_dot_product_attention(
        grouped,
        key,
        value,
        attn_mask=mask,
        scale=scaling if scaling is not None else getattr(module, "scaling", None),
    )
    return output.reshape(rows, heads, 1, value.shape[3]).transpose(1, 2).contiguous()


AttentionInterface.register(ATTENTION_NAME, windowed_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


def install(model: PreTrainedModel) -> bool:
    """Switch a model whose attention is all "sdpa" to the windowed kind
    (same results without windows); whether it now takes `row_windows`."""
    configs = [model.config, *(getattr(model.config, key, None) for key in model.config.sub_configs)]
    implementations = {getattr(c, "_attn_implementation", None) for c in configs if c is not None}
    if implementations == {ATTENTION_NAME}:
        return True
    if implementations != {"sdpa"} or not model._can_set_attn_implementation():
        return False
    model.set_attn_implementation(ATTENTION_NAME)
    return model.config._attn_implementation == ATTENTION_NAME
