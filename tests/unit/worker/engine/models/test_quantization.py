"""--quantize int8 (dynamic int8 linear layers) and int4 (4-bit groups, the int4 kernel for
small products), the output head in bfloat16 under both; the engine over a quantized model
still equals that model's own `generate`."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from tests.support.engine_runs import PROMPTS, hf_greedy, run
from worker.engine.engine import Engine
from worker.engine.models.quantization import INT4_MAX_ROWS, BFloat16Head, Int4Linear, quantize
from worker.engine.models.weight_packing import PackedLinear, pack_weights, packing_applies
from worker.engine.rows import GenerationParams, RowRequest


def quantized_model(model_dir, dtype: torch.dtype, kind: str):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    linear_layers = sum(isinstance(module, nn.Linear) for module in model.modules())
    assert quantize(model, kind) == linear_layers - 1  # all but the output head
    return model


def assert_engine_equals_generate_one_row_at_a_time(model, tokenizer) -> None:
    engine = Engine(model, tokenizer)
    params = GenerationParams(max_new_tokens=10, min_new_tokens=10)
    for prompt in PROMPTS:
        ids = engine.encode_prompt(prompt)
        (completion,) = run(engine, [RowRequest(key=0, prompt_ids=ids, params=params)]).values()
        assert completion.tokens == hf_greedy(model, ids, 10, min_new_tokens=10)


@pytest.fixture
def quantized(tiny_model_dir):
    return quantized_model(tiny_model_dir, torch.float32, "int8")


def test_every_linear_layer_but_the_head_is_int8(quantized):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    head = quantized.get_output_embeddings()
    plain = [module for module in quantized.modules() if type(module) is nn.Linear]
    assert plain == [head.projection]
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, DynamicLinear)
    assert isinstance(head, BFloat16Head) and head.weight.dtype == torch.bfloat16


def test_the_engine_over_a_quantized_model_equals_its_generate(quantized, tokenizer):
    # One row at a time: the quantized layers scale activations per call, so a
    # row's rounding depends on the other rows of its batch (docs/tuning.md, "Quantization").
    assert_engine_equals_generate_one_row_at_a_time(quantized, tokenizer)


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
    with pytest.raises(ValueError, match="int2"):
        quantize(model, "int2")


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


# --quantize int4: 4-bit weights in groups of 32, the int4 kernel for small products,
# the same weights expanded to bfloat16 for large ones.


@pytest.fixture
def int4_model(tiny_model_dir):
    return quantized_model(tiny_model_dir, torch.bfloat16, "int4")


def test_int4_quantizes_every_linear_layer_but_the_head(int4_model):
    head = int4_model.get_output_embeddings()
    assert type(head) is nn.Linear and head.weight.dtype == torch.bfloat16
    layer = int4_model.model.layers[0]
    for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.down_proj):
        assert isinstance(module, Int4Linear)
        assert module.weight.dtype == torch.bfloat16 and module.weight.shape == (
            module.out_features,
            module.in_features,
        )


def test_blockwise_4_bit_weights_come_back_exactly():
    # Q4_1-like rows: every group of 32 is levels 0..15 times a scale plus a minimum (the
    # bundled model's layers are such blocks); the expanded copy is the same weights.
    levels = torch.randint(0, 16, (48, 4, 32))
    levels[:, :, 0], levels[:, :, 1] = 0, 15  # each group spans the whole range, as Q4_1's quantizer makes it
    scale = 2.0 ** torch.randint(-8, -4, (48, 4, 1)).float()
    minimum = -scale * torch.randint(0, 16, (48, 4, 1))
    weight = (levels * scale + minimum).reshape(48, 128)
    linear = nn.Linear(128, 48, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(weight)
    assert torch.equal(linear.weight.float(), weight)  # representable exactly in bfloat16
    assert torch.equal(Int4Linear(linear).weight.float(), weight)


def test_small_products_take_the_int4_kernel_and_large_ones_the_expanded_copy():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, dtype=torch.bfloat16)
    layer = Int4Linear(linear)
    small = torch.randn(1, INT4_MAX_ROWS, 64, dtype=torch.bfloat16)
    large = torch.randn(2, INT4_MAX_ROWS, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        # both paths compute with the same weights, up to bfloat16 rounding
        torch.testing.assert_close(layer(small), layer.dense(small), atol=0.05, rtol=0.02)
        assert torch.equal(layer(large), layer.dense(large))
        layer.dense.weight.zero_()  # now only the kernel still knows the weights
        assert layer(small).abs().sum() > 0
        assert torch.equal(layer(large), layer.dense.bias.expand(2, INT4_MAX_ROWS, 32))


def test_the_engine_over_an_int4_model_equals_its_generate(int4_model, tokenizer):
    # One row at a time: generate's decode steps then take the int4 kernel as the engine's
    # do; a bigger batch would take the bfloat16 copy, equal only up to rounding.
    assert_engine_equals_generate_one_row_at_a_time(int4_model, tokenizer)


def test_int4_needs_a_bfloat16_model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with pytest.raises(ValueError, match="bfloat16"):
        quantize(model, "int4")
