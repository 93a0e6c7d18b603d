"""LoRA adapters in the engine: every row runs with its own adapter (or none),
checked against PEFT's own generation with that adapter active."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from tests.support.engine_runs import hf_greedy, run
from tests.support.tiny_loras import build_tiny_lora
from tests.support.tiny_vlms import sample_image
from worker.engine.adapters import (
    AdapterCatalog,
    AdapterLoadFailed,
    AdaptersBusy,
    LoraAdapters,
    UnknownAdapter,
    parse_named,
)
from worker.engine.engine import Engine
from worker.engine.rows import GenerationParams, RowRequest

GREEDY = GenerationParams(max_new_tokens=12, min_new_tokens=12)
PROMPTS = ["Hello there", "The capital of France is", "a b c d e f g"]


def fresh_base(tiny_model_dir: Path):
    """A base model of its own: PEFT changes the model it wraps in place."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def lora_engine(tiny_model_dir: Path, tokenizer, lora_dir: Path, max_loaded: int = 4) -> Engine:
    base = fresh_base(tiny_model_dir)
    adapters = LoraAdapters(base, AdapterCatalog(directory=lora_dir), max_loaded=max_loaded)
    return Engine(base, tokenizer, adapters=adapters)


@pytest.fixture(scope="module")
def peft_reference(tiny_model_dir, tiny_lora_dir, tokenizer):
    """PEFT's greedy generation of each prompt with each adapter active (None = the bare base model)."""
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    reference: dict[tuple[str | None, int], list[int]] = {}
    base = fresh_base(tiny_model_dir)
    for index, ids in enumerate(prompts):
        reference[None, index] = hf_greedy(base, ids, 12, min_new_tokens=12)
    model = PeftModel.from_pretrained(base, tiny_lora_dir / "alpha", adapter_name="alpha")
    model.load_adapter(tiny_lora_dir / "beta", adapter_name="beta")
    model.eval()
    for name in ("alpha", "beta"):
        model.set_adapter(name)
        for index, ids in enumerate(prompts):
            reference[name, index] = hf_greedy(model, ids, 12, min_new_tokens=12)
    return reference


def rows(engine: Engine, adapters: list[str | None], prompt: int = 0) -> list[RowRequest]:
    ids = engine.encode_prompt(PROMPTS[prompt])
    return [
        RowRequest(key=(adapter, i), prompt_ids=ids, params=GREEDY, adapter=adapter)
        for i, adapter in enumerate(adapters)
    ]


def test_the_adapters_change_greedy_output(peft_reference):
    for index in range(len(PROMPTS)):
        outputs = {tuple(peft_reference[name, index]) for name in (None, "alpha", "beta")}
        assert len(outputs) == 3


@pytest.mark.parametrize("adapter", ["alpha", "beta"])
def test_each_adapter_alone_equals_peft_generation(
    tiny_model_dir, tiny_lora_dir, tokenizer, peft_reference, adapter
):
    engine = lora_engine(tiny_model_dir, tokenizer, tiny_lora_dir)
    for index in range(len(PROMPTS)):
        (completion,) = run(engine, rows(engine, [adapter], index)).values()
        assert completion.tokens == peft_reference[adapter, index]


def test_a_mixed_batch_gives_what_each_row_gives_alone(
    tiny_model_dir, tiny_lora_dir, tokenizer, peft_reference
):
    engine = lora_engine(tiny_model_dir, tokenizer, tiny_lora_dir)
    prompts = [engine.encode_prompt(p) for p in PROMPTS]
    mixed = [
        RowRequest(key=(adapter, index), prompt_ids=prompts[index], params=GREEDY, adapter=adapter)
        for index in range(len(PROMPTS))
        for adapter in ("alpha", None, "beta")
    ]
    completions = run(engine, mixed)
    for (adapter, index), completion in completions.items():
        assert completion.tokens == peft_reference[adapter, index], (adapter, index)


def test_rows_join_a_running_batch_with_other_adapters(
    tiny_model_dir, tiny_lora_dir, tokenizer, peft_reference
):
    engine = lora_engine(tiny_model_dir, tokenizer, tiny_lora_dir)
    engine.add(rows(engine, [None]))
    completions: dict = {}
    from tests.support.engine_runs import collect

    collect(engine.step(), completions)
    engine.add([RowRequest(("alpha", 9), engine.encode_prompt(PROMPTS[1]), GREEDY, adapter="alpha")])
    collect(engine.step(), completions)
    engine.add([RowRequest(("beta", 9), engine.encode_prompt(PROMPTS[2]), GREEDY, adapter="beta")])
    while engine.has_work:
        collect(engine.step(), completions)
    assert completions[None, 0].tokens == peft_reference[None, 0]
    assert completions["alpha", 9].tokens == peft_reference["alpha", 1]
    assert completions["beta", 9].tokens == peft_reference["beta", 2]


def test_eviction_and_reload_give_the_same_output(
    tiny_model_dir, tiny_lora_dir, tokenizer, peft_reference, caplog
):
    engine = lora_engine(tiny_model_dir, tokenizer, tiny_lora_dir, max_loaded=1)
    assert engine.adapters is not None
    with caplog.at_level(logging.INFO, logger="worker.engine.adapters"):
        for adapter in ("alpha", "beta", "alpha", None, "beta"):
            (completion,) = run(engine, rows(engine, [adapter])).values()
            assert completion.tokens == peft_reference[adapter, 0], adapter
            if adapter is not None:
                assert engine.adapters.loaded == [adapter]
    messages = [record.getMessage() for record in caplog.records]
    assert sum("loaded LoRA adapter" in m for m in messages) == 4
    assert sum("evicted LoRA adapter" in m for m in messages) == 3


def test_the_least_recently_used_adapter_is_evicted(tiny_model_dir, tiny_lora_dir, tokenizer, tmp_path):
    lora_dir = tmp_path / "loras"
    shutil.copytree(tiny_lora_dir, lora_dir)
    build_tiny_lora(tiny_model_dir, lora_dir / "gamma", seed=5)
    engine = lora_engine(tiny_model_dir, tokenizer, lora_dir, max_loaded=2)
    assert engine.adapters is not None
    for adapter in ("alpha", "beta", "alpha", "gamma"):
        run(engine, rows(engine, [adapter]))
    assert engine.adapters.loaded == ["alpha", "gamma"]  # beta was the least recently used


def test_an_adapter_running_rows_use_is_never_evicted(tiny_model_dir, tiny_lora_dir, tokenizer):
    engine = lora_engine(tiny_model_dir, tokenizer, tiny_lora_dir, max_loaded=1)
    engine.add(rows(engine, ["alpha"]))
    assert not engine.adapters_fit({"beta"})
    assert engine.adapters_fit({"alpha"})
    with pytest.raises(AdaptersBusy):
        engine.add([RowRequest("b", engine.encode_prompt("x"), GREEDY, adapter="beta")])
    with pytest.raises(AdaptersBusy):
        engine.load_adapter("beta")
    assert engine.keys == [("alpha", 0)]  # nothing was added
    while engine.has_work:
        engine.step()
    assert engine.adapters_fit({"beta"})


def test_two_new_adapters_fit_only_when_two_slots_can_be_freed(tiny_model_dir, tiny_lora_dir, tokenizer):
    engine = lora_engine(tiny_model_dir, tokenizer, tiny_lora_dir, max_loaded=1)
    assert engine.adapters_fit({"alpha"})
    assert not engine.adapters_fit({"alpha", "beta"})
    with pytest.raises(AdaptersBusy):
        engine.add(rows(engine, ["alpha", "beta"]))


def test_unknown_adapters_are_refused(tiny_model_dir, tiny_lora_dir, tokenizer, tiny_model):
    engine = lora_engine(tiny_model_dir, tokenizer, tiny_lora_dir)
    assert not engine.knows_adapter("gamma")
    with pytest.raises(UnknownAdapter, match="gamma"):
        engine.add(rows(engine, ["gamma"]))
    plain = Engine(tiny_model, tokenizer)
    assert not plain.knows_adapter("alpha")
    with pytest.raises(UnknownAdapter):
        plain.add(rows(plain, ["alpha"]))
    with pytest.raises(UnknownAdapter, match="--lora-dir"):
        plain.load_adapter("alpha")


def test_adapters_copied_into_the_folder_later_are_served(tiny_model_dir, tiny_lora_dir, tokenizer, tmp_path):
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    engine = lora_engine(tiny_model_dir, tokenizer, lora_dir)
    assert engine.adapters is not None and engine.adapters.available() == []
    shutil.copytree(tiny_lora_dir / "alpha", lora_dir / "alpha")
    (lora_dir / "not-an-adapter").mkdir()
    assert engine.adapters.available() == ["alpha"]
    assert engine.load_adapter("alpha") > 0
    assert engine.load_adapter("alpha") == 0.0  # in memory already


def test_named_adapters_join_and_win_over_the_folder(tiny_lora_dir):
    catalog = AdapterCatalog(
        directory=tiny_lora_dir, named=parse_named([f"alpha={tiny_lora_dir / 'beta'}", "own=/x/y"])
    )
    assert catalog.paths() == {
        "alpha": tiny_lora_dir / "beta",
        "beta": tiny_lora_dir / "beta",
        "own": Path("/x/y"),
    }
    with pytest.raises(ValueError, match="name=path"):
        parse_named(["just-a-name"])
    with pytest.raises(ValueError, match="LoRA id"):
        AdapterCatalog(named={"__base__": Path("/x")})


def test_an_adapter_for_another_model_fails_to_load_and_leaves_the_base_untouched(
    tiny_model_dir, tiny_lora_dir, tokenizer, peft_reference, tmp_path
):
    lora_dir = tmp_path / "loras"
    shutil.copytree(tiny_lora_dir / "alpha", lora_dir / "alpha")
    broken = lora_dir / "broken"
    shutil.copytree(tiny_lora_dir / "alpha", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    engine = lora_engine(tiny_model_dir, tokenizer, lora_dir)
    with pytest.raises(AdapterLoadFailed, match="broken"):
        run(engine, rows(engine, ["broken"]))
    (completion,) = run(engine, rows(engine, [None])).values()
    assert completion.tokens == peft_reference[None, 0]
    (completion,) = run(engine, rows(engine, ["alpha"])).values()
    assert completion.tokens == peft_reference["alpha", 0]
    with pytest.raises(AdapterLoadFailed):
        engine.load_adapter("broken")
    (completion,) = run(engine, rows(engine, ["alpha"])).values()
    assert completion.tokens == peft_reference["alpha", 0]


def test_loading_from_another_thread_waits_for_the_step(
    tiny_model_dir, tiny_lora_dir, tokenizer, peft_reference
):
    engine = lora_engine(tiny_model_dir, tokenizer, tiny_lora_dir)
    engine.add(rows(engine, ["alpha", None]))
    loader = threading.Thread(target=engine.load_adapter, args=("beta",))
    completions: dict = {}
    from tests.support.engine_runs import collect

    collect(engine.step(), completions)
    loader.start()
    while engine.has_work:
        collect(engine.step(), completions)
    loader.join()
    assert engine.adapters is not None and set(engine.adapters.loaded) == {"alpha", "beta"}
    assert completions["alpha", 0].tokens == peft_reference["alpha", 0]
    assert completions[None, 1].tokens == peft_reference[None, 0]


# -- vision-language models -------------------------------------------------------


@pytest.fixture(scope="module")
def llava_processor(tiny_llava_dir):
    return AutoProcessor.from_pretrained(tiny_llava_dir)


def llava_engine(tiny_llava_dir, lora_dir, processor) -> Engine:
    base = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir, dtype=torch.float32).eval()
    adapters = LoraAdapters(base, AdapterCatalog(directory=lora_dir))
    return Engine(base, processor.tokenizer, processor=processor, adapters=adapters)


def test_image_rows_with_and_without_an_adapter_equal_peft_generation(
    tiny_llava_dir, tiny_llava_lora_dir, llava_processor
):
    image = sample_image((220, 30, 30))
    prompt = "<image>What is this?"
    inputs = llava_processor(text=prompt, images=[image], return_tensors="pt")
    base = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        plain = base.generate(**inputs, do_sample=False, max_new_tokens=10, min_new_tokens=10)
        model = PeftModel.from_pretrained(base, tiny_llava_lora_dir / "text").eval()
        adapted = model.generate(**inputs, do_sample=False, max_new_tokens=10, min_new_tokens=10)
    width = inputs["input_ids"].shape[1]
    expected = {None: plain[0, width:].tolist(), "text": adapted[0, width:].tolist()}
    assert expected[None] != expected["text"]

    engine = llava_engine(tiny_llava_dir, tiny_llava_lora_dir, llava_processor)
    params = GenerationParams(max_new_tokens=10, min_new_tokens=10)
    requests = []
    for adapter in ("text", None):
        (encoded,) = engine.encode_image_prompts(["What is this?"], [image])
        requests.append(
            RowRequest(
                key=adapter,
                prompt_ids=encoded.prompt_ids,
                params=params,
                image_features=encoded.image_features,
                adapter=adapter,
            )
        )
    text_only = engine.encode_prompt("What is this?")
    requests.append(RowRequest(key="plain text", prompt_ids=text_only, params=params, adapter="text"))
    completions = run(engine, requests)
    assert completions["text"].tokens == expected["text"]
    assert completions[None].tokens == expected[None]


def test_an_adapter_that_changes_the_vision_tower_is_refused(
    tiny_llava_dir, tiny_llava_lora_dir, llava_processor
):
    engine = llava_engine(tiny_llava_dir, tiny_llava_lora_dir, llava_processor)
    with pytest.raises(AdapterLoadFailed, match="language model only"):
        engine.load_adapter("vision")
    assert engine.load_adapter("text") > 0
    with pytest.raises(AdapterLoadFailed, match="language model only"):
        engine.load_adapter("vision")
    assert engine.adapters is not None and engine.adapters.loaded == ["text"]


def test_loading_adapters_leaves_the_base_models_parameter_flags_as_they_were(tiny_model_dir, tiny_lora_dir):
    # PEFT freezes the base; frozen weights send torch's linear over the prefill's
    # sliced last-token input to a weight-copying batched matmul (~1 s per prefill
    # with a real vocabulary), so the flags are put back after every load.
    base = fresh_base(tiny_model_dir)
    before = [parameter.requires_grad for parameter in base.parameters()]
    adapters = LoraAdapters(base, AdapterCatalog(directory=tiny_lora_dir), max_loaded=1)
    adapters.load("alpha", set())
    adapters.load("beta", set())  # evicts alpha
    from peft.tuners.lora import LoraLayer

    base_parameters = [parameter for name, parameter in base.named_parameters() if "lora_" not in name]
    assert len(base_parameters) == len(before)
    assert [parameter.requires_grad for parameter in base_parameters] == before
    assert any(isinstance(module, LoraLayer) for module in base.modules())
