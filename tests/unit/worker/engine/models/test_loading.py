"""What loading refuses before it loads any weight (worker/engine/models/loading.py)."""

from __future__ import annotations

import pytest
from transformers import BertConfig, LlamaConfig

from worker.engine.models.loading import is_encoder, load_model


@pytest.mark.parametrize("architecture", ["BertModel", "BertForSequenceClassification", "BertForMaskedLM"])
def test_an_encoder_is_refused_naming_what_it_is(tmp_path, architecture):
    BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, architectures=[architecture]
    ).save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match=f"an encoder \\({architecture}\\).*not supported yet"):
        load_model(str(tmp_path), device="cpu", dtype="float32")


def test_generative_configs_are_not_encoders():
    assert not is_encoder(LlamaConfig(architectures=["LlamaForCausalLM"]))
    assert not is_encoder(BertConfig(architectures=["BertLMHeadModel"], is_decoder=True))
    assert not is_encoder(LlamaConfig())  # no architectures: left to the loader
    assert is_encoder(BertConfig(architectures=["BertModel"]))
