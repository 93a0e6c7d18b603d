"""A KV cache layer that grows, shrinks and merges with as few copies as possible.

transformers' `DynamicLayer` appends each step's keys and values with `torch.cat`,
copying the whole layer's cache every decode step. `GrowingLayer` keeps them in a
buffer with room for more tokens (and, after rows leave, for more rows) and writes
each step's into the room; `select_rows` (rows leave) moves only the rows behind the
first one that left, and `merge_caches` (rows join) copies every batch once, into a
buffer with room to grow, in the row order asked for.

Sliding-window layers (transformers' `DynamicSlidingWindowLayer`, e.g. Gemma 3's local
layers) hold only a row's last `sliding_window - 1` columns; `select_rows` and
`merge_caches` keep them aligned with the batch's attention mask, right-aligned as
every row is, and keep their `cumulative_length` equal to the mask's width (which
transformers reads to place the window on the mask).

Easy to get wrong: `keys` / `values` are views of the buffer's filled part, so what
reads a `DynamicLayer` reads them unchanged; assigning other tensors to them hands the
layer a new starting point, which the next update copies into a fresh buffer."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

# Room for this many more tokens (or a quarter of the filled length, if more)
# whenever a buffer is (re)allocated: one copy per that many decode steps.
MIN_HEADROOM_TOKENS = 64


def _capacity(tokens: int) -> int:
    return tokens + max(MIN_HEADROOM_TOKENS, tokens // 4)


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer that appends without copying what it holds.

    Its rows are the first `len(keys)` rows of the buffer, its tokens the
    buffer's columns [start, end)."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self._keys_view: torch.Tensor | None = None
        self._values_view: torch.Tensor | None = None
        self._start = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows, added = key_states.shape[0], key_states.shape[-2]
        if self._owns_views(key_states) and self._end + added <= self._key_buffer.shape[-2]:
            start, filled = self._start, self._end
        else:
            start, filled = 0, self._reallocate(key_states, value_states)
        end = filled + added
        self._key_buffer[:rows, :, filled:end] = key_states
        self._value_buffer[:rows, :, filled:end] = value_states
        self._view(rows, start, end)
        return self.keys, self.values

    @property
    def _end(self) -> int:
        return self._start + self.keys.shape[-2]

    def _owns_views(self, key_states: torch.Tensor | None = None) -> bool:
        """Whether `keys` / `values` are still this layer's views of its buffer
        (nobody replaced them), with the new states' rows and heads."""
        replaced = self.keys is not self._keys_view or self.values is not self._values_view
        if self._key_buffer is None or replaced:
            return False
        return key_states is None or self.keys.shape[:2] == key_states.shape[:2]

    def _view(self, rows: int, start: int, end: int) -> None:
        assert self._key_buffer is not None and self._value_buffer is not None
        self._start = start
        self.keys = self._keys_view = self._key_buffer[:rows, :, start:end]
        self.values = self._values_view = self._value_buffer[:rows, :, start:end]

    def _reallocate(self, keys: torch.Tensor, values: torch.Tensor) -> int:
        """A fresh buffer with room, holding what `keys` / `values` hold now; their length."""
        filled = self.keys.shape[-2] if self.keys.numel() else 0
        capacity = _capacity(filled + keys.shape[-2])
        batch, heads = keys.shape[:2]
        key_buffer = keys.new_empty((batch, heads, capacity, keys.shape[-1]))
        value_buffer = values.new_empty((batch, heads, capacity, values.shape[-1]))
        if filled:
            key_buffer[:, :, :filled] = self.keys
            value_buffer[:, :, :filled] = self.values
        self._key_buffer, self._value_buffer = key_buffer, value_buffer
        return filled

    def keep_rows(self, keep: Sequence[int], drop_left: int) -> None:
        """Keep the rows `keep` (ascending indices), dropping the first
        `drop_left` token columns: rows behind the first dropped one move up
        within the buffer, the dropped columns are left behind the view's start."""
        if not self._owns_views() or any(b <= a for a, b in itertools.pairwise(keep)):
            copy_rows(self, keep, drop_left)
            return
        start, end = self._start + drop_left, self._end
        for target, source in enumerate(keep):
            if target != source:  # target < source: a row is never overwritten before it moves
                self._key_buffer[target, :, start:end] = self._key_buffer[source, :, start:end]
                self._value_buffer[target, :, start:end] = self._value_buffer[source, :, start:end]
        self._view(len(keep), start, end)

    def drop_last(self, dropped: Sequence[int]) -> None:
        """Forget each row's last `dropped[row]` token columns (tokens a step fed but
        did not keep, e.g. rejected drafts), keeping every row's last token in the
        last column: the columns all rows drop leave the view, a row dropping more
        moves its tokens right by the difference (zeros take their place in front)."""
        rows, _, width, _ = self.keys.shape
        if len(dropped) != rows or not all(0 <= count <= width for count in dropped):
            raise ValueError(f"cannot drop {list(dropped)} of {width} columns from {rows} rows")
        owned = self._owns_views()
        keys, values = (self.keys, self.values) if owned else (self.keys.clone(), self.values.clone())
        common = min(dropped)
        kept = width - common
        for row, count in enumerate(dropped):
            shift = count - common
            if shift == 0:
                continue
            for states in (keys, values):
                states[row, :, shift:kept] = states[row, :, : kept - shift].clone()
                states[row, :, :shift].zero_()
        if owned:
            self._view(rows, self._start, self._start + kept)
        else:
            self.keys, self.values = keys[:, :, :kept], values[:, :, :kept]

    @classmethod
    def merged(cls, layers: Sequence[DynamicLayer], width: int, order: Sequence[int]) -> GrowingLayer:
        """One layer holding the rows of `layers` (numbered across them, in
        turn) in the order `order`, each layer's rows left-padded with zeros
        to `width` tokens, in a buffer with room to grow. Rows that stay
        neighbours are copied together."""
        sources = [(layer, row) for layer in layers for row in range(layer.keys.shape[0])]
        first = layers[0]
        heads, dim = first.keys.shape[1], first.keys.shape[-1]
        merged = cls()
        merged.lazy_initialization(first.keys, first.values)
        capacity = _capacity(width)
        merged._key_buffer = first.keys.new_empty((len(order), heads, capacity, dim))
        merged._value_buffer = first.values.new_empty((len(order), heads, capacity, first.values.shape[-1]))
        target = 0
        while target < len(order):
            layer, row = sources[order[target]]
            count = 1  # a run: the next targets take the next rows of the same layer
            while (
                target + count < len(order)
                and order[target + count] == order[target] + count
                and sources[order[target + count]][0] is layer
            ):
                count += 1
            pad = width - layer.keys.shape[-2]
            for buffer, states in ((merged._key_buffer, layer.keys), (merged._value_buffer, layer.values)):
                buffer[target : target + count, :, :pad].zero_()
                buffer[target : target + count, :, pad:width] = states[row : row + count]
            target += count
        merged._view(len(order), 0, width)
        return merged

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


class RecordingCache(DynamicCache):
    """A `DynamicCache` that, while `recorded` is a dict, also keeps the keys and values
    each layer is given, [rows, heads, tokens, head_dim] per forward (a sliding-window
    layer forgets what falls out of its window; these are what the prefix cache stores)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.recorded: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.recorded is not None:
            self.recorded.setdefault(layer_idx, []).append((key_states, value_states))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def take_recorded(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's recorded keys and values, the forwards joined along the tokens;
        recording stops."""
        recorded, self.recorded = self.recorded or {}, None
        return [
            (torch.cat([k for k, _ in recorded[i]], dim=-2), torch.cat([v for _, v in recorded[i]], dim=-2))
            for i in sorted(recorded)
        ]


def growing_cache(
    config: PretrainedConfig, prefix: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()
) -> RecordingCache:
    """A cache for a model with this config whose full-attention layers grow in place
    (other kinds, e.g. sliding-window layers, stay as transformers builds them),
    holding `prefix` (each layer's keys and values of a prompt's first tokens, one row)."""
    cache = RecordingCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    for index, (keys, values) in enumerate(prefix):
        cache.update(keys, values, index)
    return cache


def holds_prefixes(config: PretrainedConfig) -> bool:
    """Whether a model's cache can be started from stored prefixes: every layer full
    attention or a sliding window."""
    layers = growing_cache(config).layers
    return bool(layers) and all(type(layer) in (GrowingLayer, DynamicSlidingWindowLayer) for layer in layers)


def takes_back_tokens(config: PretrainedConfig) -> bool:
    """Whether a model's cache can forget tokens a step fed (`drop_last_tokens`): every
    layer full attention."""
    layers = growing_cache(config).layers
    return bool(layers) and all(type(layer) is GrowingLayer for layer in layers)


def is_plain(cache: DynamicCache) -> bool:
    """True when every layer is a full-attention DynamicLayer (or a growing
    one) or a sliding-window one, holding tensors: the layers `select_rows` can
    trim and `merge_caches` can merge (other kinds keep state of their own)."""
    return all(
        type(layer) in (DynamicLayer, GrowingLayer, DynamicSlidingWindowLayer)
        and layer.is_initialized
        and not getattr(layer, "record_past", False)
        for layer in cache.layers
    )


def select_rows(cache: DynamicCache, keep: Sequence[int], drop_left: int = 0) -> None:
    """Keep the rows `keep` of `cache` (in that order) and, for plain caches,
    drop the first `drop_left` token columns (padding no kept row uses)."""
    if not is_plain(cache):
        device = next((layer.keys.device for layer in cache.layers if layer.is_initialized), None)
        cache.batch_select_indices(torch.tensor(list(keep), dtype=torch.long, device=device))
        return
    for layer in cache.layers:
        if isinstance(layer, GrowingLayer):
            layer.keep_rows(keep, drop_left)
        elif isinstance(layer, DynamicSlidingWindowLayer):
            _keep_window_rows(layer, keep, drop_left)
        else:
            copy_rows(layer, keep, drop_left)


def drop_last_tokens(cache: DynamicCache, dropped: Sequence[int]) -> None:
    """Forget each row's last `dropped[row]` token columns in every layer of `cache`
    (see GrowingLayer.drop_last); only growing full-attention layers can."""
    if not all(isinstance(layer, GrowingLayer) for layer in cache.layers):
        raise NotImplementedError("only growing full-attention cache layers can drop their last tokens")
    for layer in cache.layers:
        layer.drop_last(dropped)


def copy_rows(layer: DynamicLayer, keep: Sequence[int], drop_left: int) -> None:
    """Give `layer` copies of its rows `keep` (in that order), less their
    first `drop_left` token columns."""
    index = torch.tensor(list(keep), dtype=torch.long, device=layer.keys.device)
    layer.keys = layer.keys[index, :, drop_left:]
    layer.values = layer.values[index, :, drop_left:]


def _keep_window_rows(layer: DynamicSlidingWindowLayer, keep: Sequence[int], drop_left: int) -> None:
    """`copy_rows` for a sliding-window layer: the mask loses `drop_left` columns,
    so the window holds the last min(columns left, window - 1) of them."""
    layer.cumulative_length -= drop_left
    visible = min(layer.cumulative_length, layer.sliding_window - 1)
    index = torch.tensor(list(keep), dtype=torch.long, device=layer.keys.device)
    layer.keys = layer.keys[index, :, layer.keys.shape[-2] - visible :]
    layer.values = layer.values[index, :, layer.values.shape[-2] - visible :]


def _merged_window(
    layers: Sequence[DynamicSlidingWindowLayer], width: int, order: Sequence[int]
) -> DynamicSlidingWindowLayer:
    """`GrowingLayer.merged` for sliding-window layers: each row's window,
    left-padded with zeros to the merged window's min(width, window - 1) columns."""
    first = layers[0]
    sources = [(layer, row) for layer in layers for row in range(layer.keys.shape[0])]
    visible = min(width, first.sliding_window - 1)
    merged = DynamicSlidingWindowLayer(first.sliding_window)
    merged.lazy_initialization(first.keys, first.values)
    keys = first.keys.new_zeros((len(order), first.keys.shape[1], visible, first.keys.shape[-1]))
    values = first.values.new_zeros((len(order), first.values.shape[1], visible, first.values.shape[-1]))
    for target, source in enumerate(order):
        layer, row = sources[source]
        held = layer.keys.shape[-2]
        keys[target, :, visible - held :] = layer.keys[row]
        values[target, :, visible - held :] = layer.values[row]
    merged.keys, merged.values, merged.cumulative_length = keys, values, width
    return merged


def merge_caches(caches: Sequence[DynamicCache], width: int, order: Sequence[int]) -> DynamicCache:
    """The rows of plain `caches` (numbered across them, in turn) in the order
    `order`, left-padded to `width` tokens: the first cache, its layers
    replaced by merged growing (or sliding-window) layers."""
    if len({len(cache.layers) for cache in caches}) != 1:
        raise ValueError("caches come from models with different numbers of layers")
    merged = caches[0]
    layers: list[DynamicLayer] = []
    for index in range(len(merged.layers)):
        parts = [cache.layers[index] for cache in caches]
        if isinstance(parts[0], DynamicSlidingWindowLayer):
            layers.append(_merged_window(parts, width, order))
        else:
            layers.append(GrowingLayer.merged(parts, width, order))
    merged.layers = layers
    return merged
