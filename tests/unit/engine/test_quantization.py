"""--quantize int8: dynamic int8 linear layers, the output head in bfloat16; the
engine over a quantized model still equals that model's own `generate`."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from tests.unit.engine.test_engine import PROMPTS, hf_greedy, run
from worker.engine.engine import Engine
from worker.engine.rows import GenerationParams, RowRequest
from worker.quantization import BFloat16Head, quantize
from worker.weight_packing import PackedLinear, pack_weights, packing_applies


@pytest.fixture
def quantized(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    linear_layers = sum(isinstance(module, nn.Linear) for module in model.modules())
    assert quantize(model, "int8") == linear_layers - 1  # all but the output head
    return model


def test_every_linear_layer_but_the_head_is_int8(quantized):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    head = quantized.get_output_embeddings()
    plain = [module for module in quantized.modules() if type(module) is nn.Linear]
    assert plain == [head.projection]
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, DynamicLinear)
    assert isinstance(head, BFloat16Head) and head.weight.dtype == torch.bfloat16


def test_the_engine_over_a_quantized_model_equals_its_generate(quantized, tokenizer):
    # One row at a time: the quantized layers scale activations per call, so a
    # row's rounding depends on the other rows of its batch (see README).
    engine = Engine(quantized, tokenizer)
    params = GenerationParams(max_new_tokens=10, min_new_tokens=10)
    for prompt in PROMPTS:
        ids = engine.encode_prompt(prompt)
        (completion,) = run(engine, [RowRequest(key=0, prompt_ids=ids, params=params)]).values()
        assert completion.tokens == hf_greedy(quantized, ids, 10, min_new_tokens=10)


def test_quantization_changes_answers_but_not_their_shape(quantized, tiny_model, tokenizer):
    ids = tokenizer(PROMPTS[1])["input_ids"]
    with torch.inference_mode():
        full = tiny_model(torch.tensor([ids])).logits[0, -1]
        approximate = quantized(torch.tensor([ids])).logits[0, -1]
    assert approximate.shape == full.shape and approximate.dtype == torch.float32
    assert not torch.equal(full, approximate)
    # close, though: the same ordering at the top for a random model with large weights
    assert torch.corrcoef(torch.stack([full, approximate]))[0, 1] > 0.95


def test_none_leaves_the_model_alone_and_unknown_kinds_are_refused(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert quantize(model, "none") == 0
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    with pytest.raises(ValueError, match="int8"):
        quantize(model, "int4")


@pytest.mark.skipif(
    not packing_applies(nn.Linear(2, 2)), reason="this torch build or CPU has no oneDNN bfloat16 linear"
)
def test_the_bfloat16_head_of_an_int8_model_is_packed_alone(tiny_model_dir, quantized, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    quantize(model, "int8")
    assert pack_weights(model) == 1
    assert type(model.get_output_embeddings().projection) is PackedLinear
    ids = torch.tensor([tokenizer(PROMPTS[2])["input_ids"]])
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, quantized(ids).logits)
