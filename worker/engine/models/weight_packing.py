"""Linear layers with their weights pre-packed for oneDNN (`--pack-weights auto`).

torch's bfloat16 `linear` on a CPU hands oneDNN a plain row-major weight, which oneDNN re-lays out in its
blocked format on every call; packing each weight once, when the model loads, saves that work at every
step. The products are the same, summed in the same float32 accumulators.

Only bfloat16 weights on a CPU are packed (the whole model under `--dtype bfloat16`, the output head under
`--quantize int8`, the head and the bfloat16 copies of the 4-bit layers under `--quantize int4`): packing
float32 weights did not pay at batch 1, and GPUs have their own kernels. A packed layer stays an
`nn.Linear` (PEFT wraps it for LoRA like any other) whose `weight` is the packed tensor, so the model holds
one copy of each weight; a head tied to the input embeddings gets a packed copy of its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging

import torch
from torch import nn

from worker.engine.models.layer_swap import replace_linear_layers

log = logging.getLogger(__name__)

PACKINGS = ("auto", "off")

# oneDNN picks the packed layout for this many rows; decode steps run a few
# rows, prefills hundreds, and the layout chosen for 8 served both well.
_ROWS_HINT = 8


class PackedLinear(nn.Linear):
    """An `nn.Linear` whose weight is packed for oneDNN, for inference only."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        packed = cls.__new__(cls)
        nn.Module.__init__(packed)  # not nn.Linear's: it would allocate a weight of its own
        packed.in_features = linear.in_features
        packed.out_features = linear.out_features
        weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), _ROWS_HINT)
        packed.weight = nn.Parameter(weight, requires_grad=False)
        packed.bias = (
            nn.Parameter(linear.bias.detach(), requires_grad=False) if linear.bias is not None else None
        )
        return packed

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.weight.is_mkldnn:  # something put a plain weight back (re-tied embeddings)
            return nn.functional.linear(hidden, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(hidden, self.weight, self.bias, "none", [], "")


def packing_applies(model: nn.Module) -> bool:
    """Whether `--pack-weights auto` packs this model's bfloat16 linear layers:
    it runs on a CPU whose torch build has oneDNN with bfloat16 support."""
    parameter = next(model.parameters(), None)
    return (
        parameter is not None
        and parameter.device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def pack_weights(model: nn.Module, packing: str = "auto") -> int:
    """Pack `model`'s bfloat16 linear layers in place as `packing` asks; the
    number of layers packed (0 when packing does not apply)."""
    if packing not in PACKINGS:
        raise ValueError(f"--pack-weights must be one of {', '.join(PACKINGS)}, not {packing!r}")
    if packing == "off" or not packing_applies(model):
        return 0
    count = _pack_layers(model)
    if count:
        _return_freed_memory()  # the plain layers are gone with _pack_layers' frame
        log.info("packed %d bfloat16 linear layers for oneDNN (--pack-weights off to skip)", count)
    return count


def _pack_layers(model: nn.Module) -> int:
    return replace_linear_layers(
        model, lambda layer: layer.weight.dtype == torch.bfloat16, PackedLinear.from_linear
    )


def _return_freed_memory() -> None:
    """Hand the plain weights' freed memory back to the OS. glibc keeps freed
    blocks of this size in its heap: without this, a worker stays larger by
    the plain weights' worth for its whole life."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
