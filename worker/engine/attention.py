"""Decode-step attention that reads each row's own tokens, not its padding.

A running batch is left-padded to its longest row, and on a CPU attention reads every
column at memory speed whatever the mask says. So the engine keeps its rows sorted
longest first (worker.engine.batch) and splits each decode step's rows into a few
contiguous groups (`plan_windows`); attention runs once per group over the last
columns of the cache, which hold every real token of the group's rows. It is torch's
sdpa as transformers calls it, registered under its own name with transformers'
AttentionInterface; every call without windows (prefill, vision towers) is plain sdpa.

Easy to get wrong: a row's result equals attention over the whole padded width only
up to float rounding (masked columns add nothing to a softmax)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTENTION_NAME = "mmserve_windowed_sdpa"

# What one more group costs, in row-tokens of attention (one more attention
# call per layer, and its slicing), and the most groups a step is split into.
GROUP_COST_TOKENS = 128
MAX_GROUPS = 4

Windows = tuple[tuple[int, int, int], ...]  # (first row, end row, tokens), rows [first, end)


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
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if row_windows is None or query.shape[2] != 1 or kwargs.get("position_bias") is not None:
        # prefill, or a model adding a per-position bias (which the groups would have to slice too)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = []
    for first, end, tokens in row_windows:
        mask = attention_mask[first:end, ..., -tokens:] if attention_mask is not None else None
        keys, values = key[first:end, :, -tokens:], value[first:end, :, -tokens:]
        output, _ = sdpa_attention_forward(module, query[first:end], keys, values, mask, **kwargs)
        outputs.append(output)
    return torch.cat(outputs), None


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
