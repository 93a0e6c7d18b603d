"""Replacing a model's linear layers in place (weight packing, int4 quantization)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def replace_linear_layers(
    model: nn.Module, wanted: Callable[[nn.Linear], bool], replacement: Callable[[nn.Linear], nn.Module]
) -> int:
    """Put `replacement(layer)` wherever a plain `nn.Linear` that `wanted` picks sits in
    `model`; the number of layers replaced. A layer shared by two parents is replaced
    once, by one module both then share."""
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and wanted(child)
    ]
    replaced: dict[int, nn.Module] = {}
    for parent, name, child in targets:
        if id(child) not in replaced:
            replaced[id(child)] = replacement(child)
        setattr(parent, name, replaced[id(child)])
    return len(replaced)
