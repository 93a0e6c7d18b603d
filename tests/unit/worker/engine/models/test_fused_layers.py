"""--fuse-layers auto: Llama decoder layers run fused compute what transformers'
layers compute, so the engine over a fused model answers what the stock model
generates (text and vision-language models, float32 and bfloat16, with int4
quantization on top), and layers the fusing does not know are left alone."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from shared.settings import WorkerSettings
from tests.support import vlm_runs as vision
from tests.support.engine_runs import PROMPTS, hf_greedy, llama, run
from worker.engine.adapters import AdapterCatalog
from worker.engine.engine import Engine
from worker.engine.models.fused_layers import FusedLlamaLayer, fuse_layers
from worker.engine.models.quantization import Int4Linear, quantize
from worker.engine.rows import GenerationParams, RowRequest
from worker.main import load_for_serving

GREEDY = GenerationParams(max_new_tokens=16, min_new_tokens=16)


def fused_layers(model: nn.Module) -> list[FusedLlamaLayer]:
    return [module for module in model.modules() if isinstance(module, FusedLlamaLayer)]


@pytest.fixture(scope="module")
def fused(tiny_model_dir) -> nn.Module:
    model = llama(tiny_model_dir)
    assert fuse_layers(model) == model.config.num_hidden_layers
    return model


def test_every_decoder_layer_is_replaced_by_one_with_stacked_projections(fused, tiny_model_dir):
    plain = llama(tiny_model_dir)
    layers = fused_layers(fused)
    assert len(layers) == plain.config.num_hidden_layers
    for layer, original in zip(layers, plain.model.layers, strict=True):
        attention, mlp = original.self_attn, original.mlp
        stacked = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
        assert torch.equal(layer.qkv_proj.weight, stacked)
        assert torch.equal(layer.gate_up_proj.weight, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        assert torch.equal(layer.down_proj.weight, mlp.down_proj.weight)
    linears = {id(m) for m in fused.modules() if isinstance(m, nn.Linear)}
    assert len(linears) == 4 * len(layers) + 1  # qkv, o, gate_up, down per layer, and the head


def test_fused_layers_compute_what_transformers_layers_compute(fused, tiny_model_dir, tokenizer):
    plain = llama(tiny_model_dir)
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)  # left padding: a mask in every layer
    with torch.inference_mode():
        torch.testing.assert_close(fused(**batch).logits, plain(**batch).logits)


def test_the_engine_over_a_fused_model_answers_what_the_stock_model_generates(
    fused, tiny_model_dir, tokenizer
):
    plain = llama(tiny_model_dir)
    engine = Engine(fused, tokenizer)
    rows = [
        RowRequest(key=i, prompt_ids=engine.encode_prompt(prompt), params=GREEDY)
        for i, prompt in enumerate(PROMPTS)
    ]
    together = run(engine, rows)  # one batch: left padding, windowed attention, rows leaving
    for row in rows:
        assert together[row.key].tokens == hf_greedy(plain, row.prompt_ids, 16, min_new_tokens=16)
    later = run(engine, rows[:2])  # and again, on a fresh cache
    assert [later[k].tokens for k in (0, 1)] == [together[0].tokens, together[1].tokens]


def test_fused_bfloat16_and_int4_layers_answer_as_their_unfused_twins(tiny_model_dir, tokenizer):
    def served(fuse: str, quantize_to: str) -> nn.Module:
        model = llama(tiny_model_dir, torch.bfloat16)
        fuse_layers(model, fuse)
        quantize(model, quantize_to)
        return model

    for kind in ("none", "int4"):
        fused_model, plain = served("auto", kind), served("off", kind)
        if kind == "int4":
            assert all(isinstance(layer.qkv_proj, Int4Linear) for layer in fused_layers(fused_model))
        # bfloat16 kernels compared with transformers' own: the batch-invariant mode's
        # padded one-row products and aligned attention round otherwise (test_invariance.py)
        engine = Engine(fused_model, tokenizer, batch_invariant=False)
        for prompt in PROMPTS:
            ids = engine.encode_prompt(prompt)
            (completion,) = run(engine, [RowRequest(key=0, prompt_ids=ids, params=GREEDY)]).values()
            assert completion.tokens == hf_greedy(plain, ids, 16, min_new_tokens=16), (kind, prompt)


def test_a_vision_language_models_text_layers_are_fused_and_answer_the_same(tiny_llava_dir):
    plain, fused_vlm = vision.load(tiny_llava_dir), vision.load(tiny_llava_dir)
    assert fuse_layers(fused_vlm.model) == plain.model.config.text_config.num_hidden_layers
    engine = fused_vlm.engine()
    (prompt,) = engine.encode_image_prompts(["What is in the picture?"], [vision.RED], use_chat_template=True)
    expected = plain.generate(plain.chat_prompt("What is in the picture?", 1), [vision.RED])
    assert vision.run(engine, [vision.row("a", prompt)])["a"] == expected


def test_layers_it_does_not_know_are_left_alone(tiny_model_dir):
    adapted = get_peft_model(llama(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    assert fuse_layers(adapted) == 0  # q_proj is a LoRA layer now
    model = llama(tiny_model_dir)
    model.model.layers[0].mlp.act_fn = nn.GELU()
    assert fuse_layers(model) == model.config.num_hidden_layers - 1  # the fused MLP is SiLU's
    assert type(model.model.layers[0]).__name__ == "LlamaDecoderLayer"
    hooked = llama(tiny_model_dir)
    hooked.model.layers[1].mlp.down_proj.register_forward_hook(lambda *args: None)
    assert fuse_layers(hooked) == hooked.config.num_hidden_layers - 1  # its hook would be skipped
    assert fuse_layers(llama(tiny_model_dir), "off") == 0
    with pytest.raises(ValueError, match="auto, off"):
        fuse_layers(llama(tiny_model_dir), "always")


def test_a_worker_serving_lora_adapters_keeps_transformers_layers(tiny_model_dir, tiny_lora_dir):
    settings = WorkerSettings(redis_url="x", model=str(tiny_model_dir), dtype="float32")
    assert len(fused_layers(load_for_serving(settings).model)) == 2
    with_adapters = load_for_serving(settings, AdapterCatalog(directory=tiny_lora_dir)).model
    assert fused_layers(with_adapters) == []
    off = WorkerSettings(redis_url="x", model=str(tiny_model_dir), dtype="float32", fuse_layers="off")
    assert fused_layers(load_for_serving(off).model) == []
