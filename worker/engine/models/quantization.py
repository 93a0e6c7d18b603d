"""Weight quantization for CPU workers (`--quantize int8|int4`).

int8: torch.ao's dynamic quantization (int8 weights, one scale per output channel, activations quantized
on the fly); the rest of the model runs in float32, which those layers take as input. int4: 4-bit weights
in groups of `INT4_GROUP_SIZE` sharing a scale and a zero point (GGUF's Q4_1 layout, so the bundled
model's layers come back exactly); products of at most `INT4_MAX_ROWS` rows run torch's int4 CPU kernel,
larger ones a bfloat16 copy of the same 4-bit weights, since the kernel does not reuse a weight across rows.

Under both the output head keeps bfloat16 weights (quantizing it changed answers visibly), and int4 holds a
quarter more weight memory than bfloat16, not less: it buys decode speed at small batches. Answers differ
from the unquantized model's; compare them within one setting.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn
from transformers import PreTrainedModel

from shared.settings import QUANTIZATIONS
from worker.engine.models.layer_swap import replace_linear_layers

log = logging.getLogger(__name__)

INT4_GROUP_SIZE = 32  # weights per scale and zero point along a row, as in GGUF's Q4_0/Q4_1 blocks
# Products of up to this many rows take the int4 kernel; above it packed bfloat16 was faster
# (bench/README.md has the figures).
INT4_MAX_ROWS = 4


class BFloat16Head(nn.Module):
    """An output projection with bfloat16 weights between float32 activations
    (its bfloat16 linear layer is packed for oneDNN like any other, see
    worker.engine.models.weight_packing)."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.projection = nn.Linear(
            head.in_features, head.out_features, bias=head.bias is not None, dtype=torch.bfloat16
        )
        self.projection.requires_grad_(False)
        self.projection.weight.copy_(head.weight.detach())
        if head.bias is not None:
            self.projection.bias.copy_(head.bias.detach())

    @property
    def weight(self) -> torch.Tensor:
        return self.projection.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # contiguous: torch's linear over a sliced 3-D input and a frozen weight takes a
        # batched matmul that copies the weight per row (see worker/engine/adapters.py)
        return self.projection(hidden.to(torch.bfloat16).contiguous()).float()


class Int4Linear(nn.Module):
    """A linear layer quantized to 4 bits per weight (see the module's docstring):
    small products run torch's int4 kernel, larger ones `dense`, an ordinary
    `nn.Linear` holding the same 4-bit weights expanded to the layer's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        levels, scales, zeros = _int4_levels(linear.weight.detach())
        dtype = linear.weight.dtype
        # The kernel's weights are (level - 8) * scale + zero, computed in float32.
        expanded = (levels.float() - 8) * scales.float() + zeros.float()
        self.dense = nn.Linear(self.in_features, self.out_features, bias=linear.bias is not None, dtype=dtype)
        self.dense.requires_grad_(False)
        self.dense.weight.copy_(expanded.reshape(self.out_features, self.in_features))
        if linear.bias is not None:
            self.dense.bias.copy_(linear.bias.detach())
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            levels.reshape(self.out_features, self.in_features).to(torch.int32), 2
        )
        self.register_buffer("packed", packed)
        # [groups, out_features, 2]: each group's scale and zero point, the layout the kernel reads
        self.register_buffer(
            "scales_and_zeros", torch.stack([scales, zeros], dim=-1).squeeze(-2).transpose(0, 1).contiguous()
        )

    @staticmethod
    def applies(linear: nn.Linear) -> bool:
        """Whether the int4 kernel takes this layer's shape and dtype."""
        return (
            linear.weight.device.type == "cpu"
            and linear.weight.dtype == torch.bfloat16
            and linear.out_features % 16 == 0
            and linear.in_features % INT4_GROUP_SIZE == 0
        )

    @property
    def weight(self) -> torch.Tensor:
        return self.dense.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.numel() // self.in_features
        if rows > INT4_MAX_ROWS:
            return self.dense(hidden)
        flat = hidden.reshape(rows, self.in_features).contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.packed, INT4_GROUP_SIZE, self.scales_and_zeros
        )
        if self.dense.bias is not None:
            out = out + self.dense.bias
        return out.reshape(*hidden.shape[:-1], self.out_features)


def _int4_levels(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each group of `INT4_GROUP_SIZE` weights as levels 0..15 with a scale and a
    zero point in the weight's dtype: [out, groups, size] uint8, [out, groups, 1] twice."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
    low = groups.amin(dim=-1, keepdim=True)
    high = groups.amax(dim=-1, keepdim=True)
    scales = ((high - low) / 15).clamp(min=torch.finfo(weight.dtype).tiny).to(weight.dtype)
    zeros = (low + 8 * scales.float()).to(weight.dtype)
    # the levels nearest each weight given the scale and zero point as stored (rounded)
    levels = ((groups - zeros.float()) / scales.float()).round_().add_(8).clamp_(0, 15)
    return levels.to(torch.uint8), scales, zeros


def quantize(model: PreTrainedModel, kind: str) -> int:
    """Quantize `model` in place as `kind` asks; the number of layers quantized."""
    if kind == "none":
        return 0
    if kind not in QUANTIZATIONS:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, not {kind!r}")
    if model.device.type != "cpu":
        raise ValueError(
            f"--quantize {kind} runs on the CPU only (its kernels are CPU kernels); use --device cpu"
        )
    if kind == "int4":
        if model.dtype != torch.bfloat16:
            raise ValueError(
                f"--quantize int4 needs a bfloat16 model (torch's int4 CPU kernel is ~30x slower "
                f"in other dtypes), not {model.dtype}: use --dtype auto or bfloat16 on a CPU with bfloat16"
            )
        return _quantize_int4(model)
    return _quantize_int8(model)


def _quantize_int8(model: PreTrainedModel) -> int:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    head = model.get_output_embeddings()
    model.float()
    targets = {
        name: per_channel_dynamic_qconfig
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head
    }
    with warnings.catch_warnings():
        # torch.ao's eager-mode quantization announces its move to torchao; it still works here.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        quantize_dynamic(model, targets, dtype=torch.qint8, inplace=True)
    if isinstance(head, nn.Linear):
        model.set_output_embeddings(BFloat16Head(head))
    log.info(
        "quantized %d linear layers to int8 (dynamic, per channel); the output head is bfloat16", len(targets)
    )
    return len(targets)


def _quantize_int4(model: PreTrainedModel) -> int:
    head = model.get_output_embeddings()
    count = replace_linear_layers(
        model, lambda layer: layer is not head and Int4Linear.applies(layer), Int4Linear
    )
    log.info(
        "quantized %d linear layers to int4 (groups of %d weights; products of <= %d rows take the int4 "
        "kernel); %d layer(s) stay bfloat16 (the output head, and shapes the kernel does not take)",
        count,
        INT4_GROUP_SIZE,
        INT4_MAX_ROWS,
        sum(type(module) is nn.Linear for module in model.modules()),
    )
    return count
