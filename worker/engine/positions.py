"""Rotary position ids of a batch's rows: one axis (text models, most vision-language
models) or several (multimodal rotary positions, the Qwen2-VL family: time, height
and width, each image's tokens laid out on its grid).

A batch's `position_ids` are [rows, tokens] or [axes, rows, tokens]; rows are
always the second-last dimension, so one indexing serves both. A text row in a
batch of multimodal rows has the same position on every axis, which is what
such a model computes for text.

Easy to get wrong: after a multimodal prompt, the next position is one past the
row's largest position on any axis (an image's grid makes positions advance by
its longer side, not its token count), the same on every axis; it is not the
prompt length."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

# Model types whose `get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=...)`
# the engine calls row by row (checked against transformers' generate in the tests).
MULTIMODAL_ROPE_MODEL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl"})


def uses_multimodal_positions(model: PreTrainedModel) -> bool:
    """Whether the model places image tokens with multimodal rotary positions."""
    return hasattr(model.base_model, "get_rope_index")


def multimodal_positions_known(model: PreTrainedModel) -> bool:
    """Whether the engine computes this model's multimodal positions."""
    return getattr(model.config, "model_type", None) in MULTIMODAL_ROPE_MODEL_TYPES


def multimodal_prompt_positions(
    model: PreTrainedModel, prompt_ids: Sequence[int], image_token_id: int, image_grids: torch.Tensor
) -> torch.Tensor:
    """A prompt's multimodal positions, [axes, len(prompt_ids)], by the model's own
    rope-index logic over the prompt alone (so they never depend on other rows).
    `image_grids` ([images, 3]: time, height, width in patches) are the grids of
    the prompt's images, in order."""
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    token_types = (ids == image_token_id).int()
    positions, _ = model.base_model.get_rope_index(
        ids, mm_token_type_ids=token_types, image_grid_thw=image_grids.cpu()
    )
    return positions[:, 0]


def prompt_position_ids(attention_mask: torch.Tensor, prompts: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Position ids of left-padded prompts: each row's real tokens count from 0
    (padding gets 0, masked anyway), or, for a row given its own positions
    ([axes, length]), those, right-aligned; [rows, width] when no row has any."""
    plain = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    given = [p for p in prompts if p is not None]
    if not given:
        return plain
    width = attention_mask.shape[1]
    positions = plain[None].repeat(given[0].shape[0], 1, 1)
    for row, own in enumerate(prompts):
        if own is not None:
            positions[:, row, width - own.shape[-1] :] = own.to(positions.device)
    return positions


def next_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Each row's position for its next token ([..., rows, 1]): one past its last."""
    last = position_ids[..., -1:]
    if last.ndim == 3:
        last = last.amax(dim=0, keepdim=True).expand_as(last)
    return last + 1


def merged_position_ids(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The rows of several batches' position ids ([..., rows, 1] each) in one
    tensor; one-axis parts gain the axes of the others."""
    axes = max((p.shape[0] for p in parts if p.ndim == 3), default=None)
    if axes is not None:
        parts = [p if p.ndim == 3 else p[None].expand(axes, -1, -1) for p in parts]
    return torch.cat(list(parts), dim=-2)
