"""Llama decoder layers run as one module each (`--fuse-layers auto`): fewer calls per decode step.

`FusedLlamaLayer` stacks the query, key and value projections into one linear layer and the MLP's gate
and up projections into another, turns queries and keys in one rotary pass and calls torch's `rms_norm`
inline. Attention still goes through transformers' attention interface (whatever the model's
`_attn_implementation` names, e.g. worker.engine.attention's), over the model's own cache and mask.
`forward_segments` runs several batches packed into one sequence (worker.engine.joint).

Outputs match transformers' up to the rounding of the stacked products. Only plain `LlamaDecoderLayer`s
(their own attention, SiLU MLP and RMSNorm modules, no hooks) are replaced; LoRA adapters target the
separate projections, so a worker serving adapters keeps transformers' layers (worker.main).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama import modeling_llama as llama

log = logging.getLogger(__name__)

FUSINGS = ("auto", "off")


def _stacked(*linears: nn.Linear) -> nn.Linear:
    """One linear layer whose outputs are those of `linears`, in turn."""
    first = linears[0]
    weight = torch.cat([linear.weight.detach() for linear in linears])
    stacked = nn.Linear(first.in_features, weight.shape[0], bias=first.bias is not None, device="meta")
    stacked.weight = nn.Parameter(weight, requires_grad=False)
    if first.bias is not None:
        bias = torch.cat([linear.bias.detach() for linear in linears])
        stacked.bias = nn.Parameter(bias, requires_grad=False)
    return stacked


class _RotaryAngles:
    """A forward's rotary cosine and sine as every fused layer of it multiplies
    them: split into the head's two halves, the sine's first half negated, so
    the half-swap is a flip (`-x2 * sin` and `x2 * -sin` are the same number).
    Computed once per forward (its layers all get the same `position_embeddings`)."""

    def __init__(self) -> None:
        self._source: tuple[torch.Tensor, torch.Tensor] | None = None
        self._angles: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._source is None or cos is not self._source[0] or sin is not self._source[1]:
            signed = sin.clone()
            signed[..., : sin.shape[-1] // 2].neg_()
            self._source, self._angles = (cos, sin), (_by_halves(cos), _by_halves(signed))
        return self._angles


class FusedLlamaLayer(nn.Module):
    """A transformers `LlamaDecoderLayer`'s computation in one module (see the
    module's docstring); called the way transformers' `LlamaModel` calls its layers."""

    def __init__(self, layer: llama.LlamaDecoderLayer, rotary_angles: _RotaryAngles):
        super().__init__()
        attention, mlp = layer.self_attn, layer.mlp
        self.config = attention.config
        self.layer_idx = attention.layer_idx
        self.head_dim = attention.head_dim
        self.num_key_value_groups = attention.num_key_value_groups
        self.scaling = attention.scaling
        self.is_causal = True
        self.query_width = attention.q_proj.out_features
        self.key_width = attention.k_proj.out_features
        self.intermediate_size = mlp.gate_proj.out_features
        self.qkv_proj = _stacked(attention.q_proj, attention.k_proj, attention.v_proj)
        self.o_proj = attention.o_proj
        self.gate_up_proj = _stacked(mlp.gate_proj, mlp.up_proj)
        self.down_proj = mlp.down_proj
        self.input_norm_weight = layer.input_layernorm.weight
        self.input_norm_eps = layer.input_layernorm.variance_epsilon
        self.post_norm_weight = layer.post_attention_layernorm.weight
        self.post_norm_eps = layer.post_attention_layernorm.variance_epsilon
        self._rotary_angles = rotary_angles

    @staticmethod
    def applies(layer: nn.Module) -> bool:
        if type(layer) is not llama.LlamaDecoderLayer:
            return False
        attention, mlp = layer.self_attn, layer.mlp
        linears = (attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj)
        return (
            type(attention) is llama.LlamaAttention
            and type(mlp) is llama.LlamaMLP
            and type(layer.input_layernorm) is llama.LlamaRMSNorm
            and type(layer.post_attention_layernorm) is llama.LlamaRMSNorm
            and all(type(linear) is nn.Linear for linear in linears)
            and type(mlp.act_fn) in (nn.SiLU, SiLUActivation)
            and attention.head_dim % 2 == 0
            and not any(_hooked(module) for module in layer.modules())
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache=None,
        past_key_values=None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> torch.Tensor:
        cache = cache if cache is not None else past_key_values
        batch, length = hidden_states.shape[:2]
        query, key, value = (  # [batch, heads, length, head_dim]
            states.transpose(1, 2) for states in self._queries_keys_values(hidden_states, position_embeddings)
        )
        attended = self._attend(query, key, value, attention_mask, cache, kwargs)
        return self._after_attention(hidden_states, attended.reshape(batch, length, -1))

    def forward_segments(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        segments: Sequence[Segment],
    ) -> torch.Tensor:
        """The layer over `segments` packed one after another in one sequence
        (`hidden_states` [1, tokens, hidden]): every product runs once over all
        their tokens, and attention runs per segment, over its own cache and
        mask, as if it had been its own batch (see worker.engine.joint)."""
        query, key, value = self._queries_keys_values(hidden_states, position_embeddings)
        attended, start = [], 0
        for segment in segments:
            end = start + segment.rows * segment.length
            parts = (  # [rows, heads, length, head_dim]
                states[0, start:end].unflatten(0, (segment.rows, segment.length)).transpose(1, 2)
                for states in (query, key, value)
            )
            output = self._attend(*parts, segment.mask, segment.cache, segment.kwargs)
            attended.append(output.reshape(end - start, -1))
            start = end
        return self._after_attention(hidden_states, torch.cat(attended)[None])

    def _queries_keys_values(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries and keys (rotated) and values, each [batch, length, heads, head_dim]."""
        batch, length = hidden_states.shape[:2]
        qkv = self.qkv_proj(_rms_norm(hidden_states, self.input_norm_weight, self.input_norm_eps))
        # rotary embedding of queries and keys together: x * cos + swap_halves(x) * signed_sin
        cos, sin = position_embeddings  # [batch or 1, length, head_dim]
        rotated_width = self.query_width + self.key_width
        turned = qkv[..., :rotated_width].view(batch, length, -1, 2, self.head_dim // 2)
        cos, signed_sin = self._rotary_angles(cos, sin)
        turned = (turned * cos + turned.flip(-2) * signed_sin).view(batch, length, -1, self.head_dim)
        query_heads = self.query_width // self.head_dim
        value = qkv[..., rotated_width:].view(batch, length, -1, self.head_dim)
        return turned[:, :, :query_heads], turned[:, :, query_heads:], value

    def _attend(self, query, key, value, attention_mask, cache, kwargs) -> torch.Tensor:
        """Attention over [batch, heads, length, head_dim] states (the new keys
        and values stored in `cache` first); [batch, length, heads, head_dim]."""
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, llama.eager_attention_forward
        )
        attended, _ = attend(
            self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
        )
        return attended

    def _after_attention(self, residual: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The output projection and the MLP, each with its residual."""
        hidden_states = residual + self.o_proj(attended)
        gate_up = self.gate_up_proj(_rms_norm(hidden_states, self.post_norm_weight, self.post_norm_eps))
        gate, up = gate_up[..., : self.intermediate_size], gate_up[..., self.intermediate_size :]
        return hidden_states + self.down_proj(nn.functional.silu(gate) * up)


@dataclass
class Segment:
    """Part of a packed forward (`FusedLlamaLayer.forward_segments`): `rows`
    rows of `length` tokens each, attending through `cache` (which gets their
    keys and values) under `mask`; `kwargs` go to the attention function."""

    rows: int
    length: int
    cache: Cache
    mask: torch.Tensor | None
    kwargs: dict = field(default_factory=dict)


def _hooked(module: nn.Module) -> bool:
    """Whether something hooks into `module`'s calls (accelerate's device-placement
    hooks, forward hooks), which a fused layer would silently skip."""
    return bool(module._forward_hooks or module._forward_pre_hooks) or hasattr(module, "_hf_hook")


def _by_halves(angles: torch.Tensor) -> torch.Tensor:
    """[batch, length, head_dim] -> [batch, length, 1 (every head), 2 halves, head_dim / 2]."""
    return angles.view(*angles.shape[:-1], 1, 2, angles.shape[-1] // 2)


def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' `LlamaRMSNorm`: the normalisation in float32 (torch's
    `rms_norm`, which computes transformers' `x * rsqrt(mean(x^2) + eps)` in
    one call, bit for bit), rounded to the input's dtype, times the weight."""
    dtype = hidden.dtype
    normalised = nn.functional.rms_norm(hidden.to(torch.float32), (hidden.shape[-1],), None, eps)
    return weight * normalised.to(dtype)


def fuse_layers(model: nn.Module, fusing: str = "auto") -> int:
    """Replace `model`'s Llama decoder layers by fused ones as `fusing` asks;
    the number replaced."""
    if fusing not in FUSINGS:
        raise ValueError(f"--fuse-layers must be one of {', '.join(FUSINGS)}, not {fusing!r}")
    if fusing == "off":
        return 0
    count = 0
    for module in list(model.modules()):
        if not isinstance(module, nn.ModuleList):
            continue
        rotary_angles = _RotaryAngles()
        for index, layer in enumerate(module):
            if FusedLlamaLayer.applies(layer):
                module[index] = FusedLlamaLayer(layer, rotary_angles)
                count += 1
    if count:
        log.info("fused %d decoder layers (stacked projections, one module per layer)", count)
    return count
