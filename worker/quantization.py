"""Weight quantization for CPU workers (`--quantize int8`).

int8: every linear layer but the output head becomes a dynamically quantized
int8 layer (torch.ao's dynamic quantization: int8 weights with one scale per
output channel, activations quantized on the fly, fbgemm kernels). The output
head keeps bfloat16 weights: quantizing the vocabulary projection too measured
faster still but changed answers visibly (a turn that should end kept going).
The rest of the model (embeddings, norms, attention) runs in float32, which
the quantized layers take as input.

On this project's 2-core development machine, with the bundled SmolLM2-135M
and 1 thread, one decode step took 31.6 ms at batch 1 and 45.2 ms at batch 8,
against 55.9 ms and 62.7 ms in bfloat16 (see README, "Benchmarks"). Outputs
differ from the unquantized model's: compare answers within one setting.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn
from transformers import PreTrainedModel

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "int8")


class BFloat16Head(nn.Module):
    """An output projection with bfloat16 weights between float32 activations
    (its bfloat16 linear layer is packed for oneDNN like any other, see
    worker.weight_packing)."""

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


def quantize(model: PreTrainedModel, kind: str) -> int:
    """Quantize `model` in place as `kind` asks; the number of layers quantized."""
    if kind == "none":
        return 0
    if kind != "int8":
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, not {kind!r}")
    if model.device.type != "cpu":
        raise ValueError("--quantize int8 runs on the CPU only (dynamic int8 kernels); use --device cpu")
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
