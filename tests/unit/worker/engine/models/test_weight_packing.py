"""--pack-weights auto: bfloat16 linear layers with oneDNN-packed weights give
the same products as torch's own linear, so the engine over a packed model
still answers what the unpacked model answers; LoRA wraps packed layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM

from tests.support.engine_runs import PROMPTS, hf_greedy, run
from worker.engine.adapters import AdapterCatalog, LoraAdapters
from worker.engine.batch import Batch
from worker.engine.engine import Engine
from worker.engine.models.weight_packing import PackedLinear, pack_weights, packing_applies
from worker.engine.rows import GenerationParams, RowRequest

GREEDY = GenerationParams(max_new_tokens=12, min_new_tokens=12)


def bf16_model(model_dir: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()


def linear_layers(model: nn.Module) -> int:
    return len({id(module) for module in model.modules() if isinstance(module, nn.Linear)})


pytestmark = pytest.mark.skipif(
    not packing_applies(nn.Linear(2, 2, dtype=torch.bfloat16)),
    reason="this torch build or CPU has no oneDNN bfloat16 linear",
)


@pytest.fixture(scope="module")
def packed(tiny_model_dir):
    model = bf16_model(tiny_model_dir)
    assert pack_weights(model) == linear_layers(model)
    return model


def test_every_bfloat16_linear_layer_is_packed_once(packed):
    layers = [module for module in packed.modules() if isinstance(module, nn.Linear)]
    assert layers and all(type(layer) is PackedLinear for layer in layers)
    assert all(layer.weight.is_mkldnn for layer in layers)
    # the tied head got a packed copy; the embeddings keep their plain table
    assert packed.config.tie_word_embeddings
    assert not packed.get_input_embeddings().weight.is_mkldnn
    assert packed.get_output_embeddings().weight.shape == packed.get_input_embeddings().weight.shape


def test_packed_layers_compute_what_torch_linear_computes(tiny_model_dir, packed, tokenizer):
    plain = bf16_model(tiny_model_dir)
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            torch.testing.assert_close(packed(ids).logits, plain(ids).logits)


def test_the_engine_over_a_packed_model_answers_what_the_plain_model_generates(
    tiny_model_dir, packed, tokenizer
):
    plain = bf16_model(tiny_model_dir)
    engine = Engine(packed, tokenizer, batch_invariant=False)  # kernels against transformers' own
    for prompt in PROMPTS:
        ids = engine.encode_prompt(prompt)
        (completion,) = run(engine, [RowRequest(key=0, prompt_ids=ids, params=GREEDY)]).values()
        assert completion.tokens == hf_greedy(plain, ids, 12, min_new_tokens=12)


def test_a_batch_over_a_packed_model_equals_its_rows_alone(packed, tokenizer):
    engine = Engine(packed, tokenizer)
    rows = [
        RowRequest(key=i, prompt_ids=engine.encode_prompt(prompt), params=GREEDY)
        for i, prompt in enumerate(PROMPTS)
    ]
    together = run(engine, rows)
    for row in rows:
        (alone,) = run(engine, [row]).values()
        # bfloat16: padding changes rounding, so compare the first tokens (see the engine's docstring)
        assert together[row.key].tokens[:4] == alone.tokens[:4]


def test_re_tied_embeddings_fall_back_to_the_plain_product(tiny_model_dir, tokenizer):
    model = bf16_model(tiny_model_dir)
    pack_weights(model)
    model.get_output_embeddings().weight = model.get_input_embeddings().weight
    ids = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, bf16_model(tiny_model_dir)(ids).logits)


def test_packing_leaves_float32_models_and_off_alone(tiny_model_dir):
    float32 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert pack_weights(float32) == 0
    assert type(float32.get_output_embeddings()) is nn.Linear
    model = bf16_model(tiny_model_dir)
    assert pack_weights(model, "off") == 0
    assert type(model.get_output_embeddings()) is nn.Linear
    with pytest.raises(ValueError, match="auto, off"):
        pack_weights(model, "always")


def test_lora_adapters_wrap_packed_layers(tiny_model_dir, tiny_lora_dir, tokenizer):
    base = bf16_model(tiny_model_dir)
    pack_weights(base)
    engine = Engine(base, tokenizer, adapters=LoraAdapters(base, AdapterCatalog(directory=tiny_lora_dir)))
    ids = engine.encode_prompt(PROMPTS[1])
    rows = [
        RowRequest(key=name, prompt_ids=ids, params=GREEDY, adapter=name) for name in ("alpha", "beta", None)
    ]
    completions = run(engine, rows)
    reference = PeftModel.from_pretrained(
        bf16_model(tiny_model_dir), tiny_lora_dir / "alpha", adapter_name="alpha"
    )
    reference.load_adapter(tiny_lora_dir / "beta", adapter_name="beta")
    reference.eval()
    for name in ("alpha", "beta"):
        reference.set_adapter(name)
        (alone,) = run(engine, [RowRequest(key=0, prompt_ids=ids, params=GREEDY, adapter=name)]).values()
        assert alone.tokens == hf_greedy(reference, ids, 12, min_new_tokens=12)
        assert completions[name].tokens[:4] == alone.tokens[:4]
    assert completions["alpha"].tokens != completions["beta"].tokens


def test_prefills_pad_to_the_width_multiple_asked_for(packed, tiny_model, tokenizer):
    # --prefill-width-multiple: oneDNN keeps a primitive (and its scratch memory) per product shape
    assert Engine(packed, tokenizer).prefill_width(37) == 37  # by default prompts are not padded
    engine = Engine(packed, tokenizer, prefill_width_multiple=16)
    assert [engine.prefill_width(n) for n in (1, 16, 17, 37)] == [16, 16, 32, 48]
    rows = [RowRequest(key=0, prompt_ids=list(range(5, 42)), params=GREEDY)]
    batch = Batch.from_rows(
        rows,
        tokenizer=tokenizer,
        eos_token_ids=engine.eos_token_ids,
        vocab_size=engine.vocab_size,
        pad_token_id=engine.pad_token_id,
        width_multiple=engine.prefill_width_multiple,
    )
    assert batch.input_ids.shape == (1, 48) and int(batch.attention_mask.sum()) == 37
    # padded rows still generate what the unpadded model generates (float32: exactly)
    float32 = Engine(tiny_model, tokenizer, prefill_width_multiple=16)
    ids = float32.encode_prompt(PROMPTS[0])
    (completion,) = run(float32, [RowRequest(key=0, prompt_ids=ids, params=GREEDY)]).values()
    assert completion.tokens == hf_greedy(tiny_model, ids, 12, min_new_tokens=12)
    with pytest.raises(ValueError, match="at least 1"):
        Engine(tiny_model, tokenizer, prefill_width_multiple=0)
