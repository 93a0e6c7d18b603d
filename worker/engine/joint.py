"""One forward for a decode step and the prefill of rows joining it.

On a CPU most of a decode step is reading the weights, whatever the number of
tokens, so `JointForward` packs the running rows' new tokens and each newcomer's
prompt into one sequence: every matrix product runs once over all of them, and
attention runs per part (`FusedLlamaLayer.forward_segments`), the running rows over
their own cache as in a decode step, each newcomer causally over its own prompt as in
a prefill of it alone. Each row computes what it would in its own forward, up to the
rounding of products over more rows.

Easy to get wrong: only models whose decoder layers are all fused Llama layers
(worker.engine.models.fused_layers) in a plain `LlamaForCausalLM` have one; for
everything else the engine prefills newcomers in a forward of their own."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask
from transformers.models.llama import modeling_llama as llama

from worker.engine.batch import Batch
from worker.engine.models.fused_layers import FusedLlamaLayer, Segment


class JointForward:
    """Runs a model over a running batch's next tokens and newcomers' prompts at once."""

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def for_model(cls, model: nn.Module) -> JointForward | None:
        """A joint forward over `model`, or None when the model is not one it knows."""
        inner = getattr(model, "model", None)
        if type(inner) is not llama.LlamaModel or not isinstance(getattr(model, "lm_head", None), nn.Module):
            return None
        layers = list(inner.layers)[: inner.config.num_hidden_layers]
        if not layers or not all(isinstance(layer, FusedLlamaLayer) for layer in layers):
            return None
        return cls(model)

    def __call__(
        self, running: Batch | None, joining: Sequence[Batch], decode_kwargs: dict | None = None
    ) -> None:
        """Run `running` (ready to run one token per row, or None) and the
        `joining` batches (one unpadded row each, ready to prefill) in one
        forward: each batch's cache gets its keys and values and its `logits`
        the next-token logits. `decode_kwargs` go to the running rows'
        attention (e.g. their windows)."""
        batches = ([running] if running is not None else []) + list(joining)
        if any(len(batch) != 1 for batch in joining):
            raise ValueError("joining batches hold one row each")
        inner = self.model.model
        config = inner.config
        input_ids = torch.cat([batch.input_ids.reshape(-1) for batch in batches])[None]
        position_ids = torch.cat([batch.position_ids.reshape(-1) for batch in batches])[None]
        embeds = inner.embed_tokens(input_ids)
        segments, last_tokens, start = [], [], 0
        for batch in batches:
            rows, length = batch.input_ids.shape
            end = start + rows * length
            mask = create_causal_mask(  # the mask the model would build for this batch alone
                config=config,
                inputs_embeds=embeds[0, start:end].view(rows, length, -1),
                attention_mask=batch.attention_mask,
                cache=batch.cache,
                position_ids=batch.position_ids,
            )
            kwargs = decode_kwargs if batch is running and decode_kwargs else {}
            segments.append(Segment(rows, length, batch.cache, mask, kwargs))
            last_tokens.extend(range(start + length - 1, end, length))  # each row's last token
            start = end
        hidden = embeds
        position_embeddings = inner.rotary_emb(hidden, position_ids=position_ids)
        for layer in inner.layers[: config.num_hidden_layers]:
            hidden = layer.forward_segments(hidden, position_embeddings, segments)
        hidden = inner.norm(hidden)
        index = torch.tensor(last_tokens, dtype=torch.long, device=hidden.device)
        logits = self.model.lm_head(hidden[:, index])[0]
        first = 0
        for batch in batches:
            batch.logits = logits[first : first + len(batch)]
            first += len(batch)
