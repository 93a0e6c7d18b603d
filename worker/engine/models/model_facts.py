"""What the engine reads off a model: the arguments its forward takes, the width of its logits."""

from __future__ import annotations

import inspect

from transformers import PreTrainedModel


def forward_arguments(model: PreTrainedModel) -> tuple[str, dict[str, object]]:
    """The name the model's forward gives its KV cache, and the extra arguments it
    takes: transformers 5 names the cache `cache`, older (remote code) models
    `past_key_values`; `logits_to_keep=1` where accepted (only the last position's
    logits are sampled)."""
    accepted = inspect.signature(model.forward).parameters
    cache_argument = "cache" if "cache" in accepted else "past_key_values"
    extra: dict[str, object] = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
    return cache_argument, extra


def logit_columns(model: PreTrainedModel) -> int:
    """Columns of the model's logits (may exceed the tokenizer's vocabulary)."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if callable(weight):  # a quantized Linear hands out its weight through a method
        weight = weight()
    if weight is not None:
        return int(weight.shape[0])
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.vocab_size)
