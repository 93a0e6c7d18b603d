"""A KV cache that grows in place.

transformers' `DynamicLayer` appends each step's keys and values with
`torch.cat`, which copies the whole layer's cache every decode step: at
batch 8 with ~330-token contexts that copying was a sixth of the step on the
development machine, and it grows with the context. `GrowingLayer` keeps
its keys and values at the front of a buffer with room for more tokens and
writes each step's into the room; `keys` / `values` are views of the filled
part, so everything that reads a `DynamicLayer` (masks, attention,
`Batch.filter` / `concatenate`) reads it unchanged. Whoever assigns other
tensors to `keys` / `values` (filtering rows, trimming padding, merging
batches) simply hands the layer a new starting point: the next update copies
it into a fresh buffer with room.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer

# Room for this many more tokens (or a quarter of the filled length, if more)
# whenever a buffer is (re)allocated: one copy per that many decode steps.
MIN_HEADROOM_TOKENS = 64


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer that appends without copying what it holds."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        filled = self.keys.shape[-2] if self.keys.numel() else 0
        end = filled + key_states.shape[-2]
        if not self._has_room(key_states, end):
            self._reallocate(key_states, value_states, filled, end)
        assert self._key_buffer is not None and self._value_buffer is not None
        self._key_buffer[:, :, filled:end] = key_states
        self._value_buffer[:, :, filled:end] = value_states
        self.keys = self._key_buffer[:, :, :end]
        self.values = self._value_buffer[:, :, :end]
        return self.keys, self.values

    def _has_room(self, key_states: torch.Tensor, end: int) -> bool:
        """Whether `keys` is still the front of this layer's buffer (nobody
        replaced it) and the buffer holds `end` tokens."""
        buffer = self._key_buffer
        return (
            buffer is not None
            and self.keys.data_ptr() == buffer.data_ptr()
            and self.values.data_ptr() == self._value_buffer.data_ptr()
            and self.keys.shape[:2] == buffer.shape[:2] == key_states.shape[:2]
            and self.keys.stride() == buffer.stride()
            and end <= buffer.shape[-2]
        )

    def _reallocate(self, keys: torch.Tensor, values: torch.Tensor, filled: int, end: int) -> None:
        capacity = end + max(MIN_HEADROOM_TOKENS, end // 4)
        batch, heads = keys.shape[:2]
        self._key_buffer = keys.new_empty((batch, heads, capacity, keys.shape[-1]))
        self._value_buffer = values.new_empty((batch, heads, capacity, values.shape[-1]))
        if filled:
            self._key_buffer[:, :, :filled] = self.keys
            self._value_buffer[:, :, :filled] = self.values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


def growing_cache(config: PretrainedConfig) -> DynamicCache:
    """A `DynamicCache` for a model with this config whose full-attention
    layers grow in place (other kinds, e.g. sliding-window layers, stay as
    transformers builds them)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
