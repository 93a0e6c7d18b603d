"""Batch invariance: a row's tokens do not depend on the other rows of its batch, on
when it joined, or on its padding (the engine's `batch_invariant` mode, on by default).

Measured on a CPU in bfloat16 (bench/batch_invariance.py), three things made a row's
answer depend on its company, and the mode answers each:

- prefill attention under a padding mask: every row is prefilled in a forward of
  its own, unpadded (worker.engine.engine), as it is when it runs alone;
- decode attention over left-padded keys: torch's CPU attention reduces over keys in
  blocks counted from the first column, so the padding in front of a row moves its
  keys across those blocks; each row is attended over a width that depends on its own
  key count only (rounded up to `ALIGNED_WIDTH_MULTIPLE`, its keys at the end), rows of
  one width in one call (worker.engine.attention);
- a one-row linear product (a decode step alone) can take another kernel path than
  the products of 2+ rows, whose rows all agree: `pad_single_rows` probes each linear
  shape at start and pads the one-row products of those where one row rounds
  otherwise to two rows. It shows for some inputs only (on the bundled model's
  `down_proj`, K = 1536, for about 1 row in 10; never for its K = 576 products), so
  the probe compares many rows at two scales.

What it does not cover is reported (`Coverage`), never assumed: a linear shape whose
rows differ between products of 2+ rows (float32 products do, oneDNN's bfloat16 ones
do not), quantized layers, and attention that does not go through torch's sdpa."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger(__name__)

# Row counts a linear shape is probed at (a row's result must agree across all but 1).
PROBED_ROW_COUNTS = (1, 2, 3, 4, 5, 8, 11, 16, 32, 64, 256)
PROBED_ROWS = 16  # rows compared in each product of 2+ rows
PROBED_SINGLE_ROWS = 64  # rows compared alone against the same rows in one product
PROBED_SCALES = (1.0, 4.0)  # input scales (a one-row product's rounding shows for some inputs only)


@dataclass
class Coverage:
    """Whether the engine's batch-invariant mode covers this model, and if not, why."""

    reasons: list[str] = field(default_factory=list)
    padded_shapes: list[str] = field(default_factory=list)  # "in x out dtype" shapes padded to two rows

    @property
    def covered(self) -> bool:
        return not self.reasons

    def describe(self) -> str:
        if self.covered:
            return "batch invariant"
        return "not batch invariant: " + "; ".join(self.reasons)


class SingleRowPadded(nn.Module):
    """A linear layer whose one-row products run as two-row products (the second row
    zeros, dropped), so they round as the layer's batched products do."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.numel() != hidden.shape[-1]:
            return self.linear(hidden)
        flat = hidden.reshape(1, hidden.shape[-1])
        doubled = torch.cat([flat, flat.new_zeros(flat.shape)])
        return self.linear(doubled)[:1].reshape(*hidden.shape[:-1], -1)


def _linear_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) for every nn.Linear (packed ones included) of `model`."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and not isinstance(parent, SingleRowPadded):
                found.append((parent, name, child))
    return found


def _probe_inputs(layer: nn.Linear) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(max(PROBED_ROW_COUNTS), layer.in_features, generator=generator)
    weight = layer.weight
    return [(inputs * scale).to(weight.device, weight.dtype) for scale in PROBED_SCALES]


@torch.inference_mode()
def _probe(layer: nn.Linear) -> tuple[bool, bool]:
    """(a one-row product rounds otherwise, a row's result is the same in products of
    any 2+ rows) for this layer's shape, from random inputs in its dtype."""
    single_differs, batched_agree = False, True
    for inputs in _probe_inputs(layer):
        reference = layer(inputs)
        single_differs |= any(
            not torch.equal(layer(inputs[row : row + 1]), reference[row : row + 1])
            for row in range(PROBED_SINGLE_ROWS)
        )
        compared = {count: min(count, PROBED_ROWS) for count in PROBED_ROW_COUNTS if count > 1}
        batched_agree &= all(
            torch.equal(layer(inputs[:count])[:rows], reference[:rows]) for count, rows in compared.items()
        )
    return single_differs, batched_agree


def pad_single_rows(model: nn.Module) -> Coverage:
    """Wrap in SingleRowPadded the linear layers whose one-row products round otherwise
    than their batched ones; what is covered (each shape probed once)."""
    coverage = Coverage()
    verdicts: dict[tuple, tuple[bool, bool]] = {}
    started = time.perf_counter()
    for parent, name, layer in _linear_layers(model):
        dtype = str(layer.weight.dtype).removeprefix("torch.")
        shape = (type(layer), layer.in_features, layer.out_features, dtype, layer.weight.device)
        if shape not in verdicts:
            verdicts[shape] = _probe(layer)
            single_differs, batched_agree = verdicts[shape]
            label = f"{layer.in_features}x{layer.out_features} {dtype}"
            if not batched_agree:
                coverage.reasons.append(f"linear {label}: a row's result changes with the number of rows")
            elif single_differs:
                coverage.padded_shapes.append(label)
        if verdicts[shape] == (True, True):
            setattr(parent, name, SingleRowPadded(layer))
    log.info(
        "batch invariance: probed %d linear shape(s) in %.1f s; one-row products padded for %s",
        len(verdicts),
        time.perf_counter() - started,
        ", ".join(coverage.padded_shapes) or "none",
    )
    return coverage


def unpadded(model: nn.Module) -> None:
    """Undo `pad_single_rows`."""
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, SingleRowPadded):
                setattr(parent, name, child.linear)


def other_limits(model: nn.Module, attention_installed: bool, quantized: Sequence[str]) -> list[str]:
    """What else keeps the mode from covering a model: attention outside torch's sdpa,
    quantized layers."""
    reasons = []
    if not attention_installed:
        reasons.append("its attention does not run through torch's sdpa, which the mode aligns")
    if quantized:
        reasons.append(f"quantized layers ({', '.join(sorted(set(quantized)))}) are not made batch invariant")
    return reasons
