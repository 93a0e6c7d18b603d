"""The engine with vision-language models (tiny random LLaVA, Idefics3 and SmolVLM),
checked against `model.generate(**processor(...), do_sample=False)`."""

from __future__ import annotations

from collections.abc import Hashable

import pytest
from PIL import Image

from tests.support.engine_runs import windows_used
from tests.support.tiny_vlms import counting_encoder, sample_image
from tests.support.vlm_runs import GREEDY, RED, row, run
from worker.engine.engine import Engine, ImagesNotAccepted, PromptError
from worker.engine.rows import GenerationParams, RowRequest
from worker.engine.vision import FeatureCache

BLUE = sample_image((20, 40, 210))
TALL = sample_image((30, 160, 60), size=(20, 90))  # Idefics3 splits it into fewer tiles


def test_greedy_output_equals_hf_generate_on_the_same_image(vlm):
    engine = vlm.engine()
    (prompt,) = engine.encode_image_prompts(["What is in the picture?"], [RED], use_chat_template=True)
    expected_prompt = vlm.chat_prompt("What is in the picture?", 1)
    assert prompt.prompt_ids == vlm.processor(text=expected_prompt, images=RED)["input_ids"][0]
    assert run(engine, [row("a", prompt)])["a"] == vlm.generate(expected_prompt, [RED])


def test_rows_with_different_images_and_without_images_share_one_batch(vlm):
    engine = vlm.engine()
    question = "Describe it."
    rows, expected = [], {}
    for name, image in (("red", RED), ("blue", BLUE), ("tall", TALL)):
        (prompt,) = engine.encode_image_prompts([question], [image], use_chat_template=True)
        rows.append(row(name, prompt))
        expected[name] = vlm.generate(vlm.chat_prompt(question, 1), [image])
    text_ids = engine.encode_prompt("Hello there", use_chat_template=True)
    rows.append(RowRequest(key="text", prompt_ids=text_ids, params=GREEDY))
    expected["text"] = vlm.generate(vlm.chat_prompt("Hello there", 0), [])
    assert run(engine, rows) == expected
    assert len({tuple(tokens) for tokens in expected.values()}) == len(expected), "images should matter"


def test_changing_one_image_changes_only_its_row(vlm):
    def answers(images: list[Image.Image]) -> dict[Hashable, list[int]]:
        engine = vlm.engine()
        prompts = [engine.encode_image_prompts(["What?"], [image])[0] for image in images]
        return run(engine, [row(index, prompt) for index, prompt in enumerate(prompts)])

    before = answers([RED, BLUE, RED])
    after = answers([RED, TALL, RED])
    assert before[0] == after[0] and before[2] == after[2]
    assert before[1] != after[1]


def test_prompts_of_one_request_share_one_encoding_of_the_image(vlm):
    engine = vlm.engine()
    calls = counting_encoder(engine)
    texts = ["What is it?", "Which colour is it?", "Is it big?"]
    prompts = engine.encode_image_prompts(texts, [BLUE], use_chat_template=True)
    assert len(calls) == 1
    assert len({id(prompt.image_features) for prompt in prompts}) == 1
    tokens = run(engine, [row(index, prompt) for index, prompt in enumerate(prompts)])
    for index, text in enumerate(texts):
        assert tokens[index] == vlm.generate(vlm.chat_prompt(text, 1), [BLUE])


def test_requests_sending_the_same_images_again_reuse_their_encoding(vlm):
    engine = vlm.engine()
    calls = counting_encoder(engine)
    first = engine.encode_image_prompts(["What is it?"], [RED, BLUE], images_key=("red", "blue"))
    again = engine.encode_image_prompts(
        ["Which colour?", "Is it big?"], [RED, BLUE], use_chat_template=True, images_key=("red", "blue")
    )
    assert len(calls) == 1 and again[0].image_features is first[0].image_features
    engine.encode_image_prompts(["What is it?"], [BLUE, RED], images_key=("blue", "red"))  # other order
    engine.encode_image_prompts(["What is it?"], [RED, BLUE])  # no key: not looked up
    assert len(calls) == 3
    tokens = run(engine, [row(index, prompt) for index, prompt in enumerate(again)])
    for index, text in enumerate(["Which colour?", "Is it big?"]):
        assert tokens[index] == vlm.generate(vlm.chat_prompt(text, 2), [RED, BLUE])


def test_the_feature_cache_keeps_the_most_recent_encodings_within_its_bytes(llava):
    engine = llava.engine()
    (red,) = engine.encode_image_prompts(["What?"], [RED])
    size = red.image_features.nbytes
    cache = FeatureCache(max_bytes=2 * size)
    cache.put("a", red.image_features)
    cache.put("b", red.image_features)
    assert cache.get("a") is red.image_features  # now "b" is the least recently used
    cache.put("c", red.image_features)
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert len(cache) == 2 and cache.bytes == 2 * size
    tiny = FeatureCache(max_bytes=size - 1)
    tiny.put("a", red.image_features)  # larger than the whole budget: not kept
    assert len(tiny) == 0 and tiny.bytes == 0


def test_several_images_in_one_prompt_equal_hf_generate(vlm):
    engine = vlm.engine()
    (prompt,) = engine.encode_image_prompts(["Compare them."], [RED, TALL], use_chat_template=True)
    expected = vlm.generate(vlm.chat_prompt("Compare them.", 2), [RED, TALL])
    assert run(engine, [row("pair", prompt)])["pair"] == expected


def test_without_chat_template_images_go_before_the_text_unless_placed(vlm):
    engine = vlm.engine()
    placeholder = engine.vision.image_token  # what a prompt writes per image, e.g. <image>
    (leading,) = engine.encode_image_prompts(["Caption:"], [RED])
    marker = engine.vision._raw_marker  # the placeholder, between vision markers where the model has them
    assert placeholder in marker
    assert leading.prompt_ids == vlm.processor(text=marker + "Caption:", images=RED)["input_ids"][0]
    assert run(engine, [row("leading", leading)])["leading"] == vlm.generate(marker + "Caption:", [RED])
    text = f"First {marker} then {marker}: which is red?"
    (placed,) = engine.encode_image_prompts([text], [RED, TALL])
    assert placed.prompt_ids == vlm.processor(text=text, images=[RED, TALL])["input_ids"][0]
    assert run(engine, [row("placed", placed)])["placed"] == vlm.generate(text, [RED, TALL])
    with pytest.raises(PromptError, match=r"holds 2 .* placeholder\(s\) but the request has 1 image"):
        engine.encode_image_prompts([f"{placeholder} and {placeholder}"], [RED])


def test_prompt_max_tokens_cuts_text_before_the_image_never_the_image(vlm):
    engine = vlm.engine()
    (whole,) = engine.encode_image_prompts(["Tell me."], [RED], use_chat_template=True)
    image_tokens = whole.image_features.tokens
    first_image = next(i for i, t in enumerate(whole.prompt_ids) if t == engine.vision.image_token_id)
    keep = len(whole.prompt_ids) - 2  # drops two tokens of the chat prefix
    assert keep > len(whole.prompt_ids) - first_image
    (cut,) = engine.encode_image_prompts(["Tell me."], [RED], use_chat_template=True, prompt_max_tokens=keep)
    assert cut.prompt_ids == whole.prompt_ids[-keep:]
    assert engine.vision.count_image_tokens(cut.prompt_ids) == image_tokens
    run(engine, [row("cut", cut)])  # still runs: every image token kept
    with pytest.raises(PromptError, match="cut into the image"):
        engine.encode_image_prompts(["Tell me."], [RED], use_chat_template=True, prompt_max_tokens=5)


def test_sampled_image_rows_repeat_with_a_seed_whatever_shares_the_batch(llava):
    sampled = GenerationParams(max_new_tokens=8, temperature=1.0, top_k=0, seed=11)
    engine = llava.engine()
    (alone,) = engine.encode_image_prompts(["Go"], [RED])
    solo = run(engine, [row("x", alone, sampled)])["x"]
    (again,) = engine.encode_image_prompts(["Go"], [RED])
    (other,) = engine.encode_image_prompts(["Something else entirely"], [BLUE])
    mixed = run(engine, [row("y", other, GREEDY), row("x", again, sampled)])
    assert mixed["x"] == solo


def test_rows_join_a_running_batch_of_image_and_text_rows(vlm):
    engine = vlm.engine()
    (tall,) = engine.encode_image_prompts(["Describe it."], [TALL], use_chat_template=True)
    text_ids = engine.encode_prompt("Once upon a time", use_chat_template=True)
    engine.add([row("tall", tall), RowRequest(key="text", prompt_ids=text_ids, params=GREEDY)])
    tokens: dict[Hashable, list[int]] = {"tall": [], "text": [], "blue": [], "late text": []}
    for output in engine.step() + engine.step():
        tokens[output.key].append(output.token_id)
    (blue,) = engine.encode_image_prompts(["What?"], [BLUE], use_chat_template=True)
    engine.add([row("blue", blue)])
    for output in engine.step():
        tokens[output.key].append(output.token_id)
    late_ids = engine.encode_prompt("Hello there", use_chat_template=True)
    engine.add([RowRequest(key="late text", prompt_ids=late_ids, params=GREEDY)])
    while engine.has_work:
        for output in engine.step():
            tokens[output.key].append(output.token_id)
    assert tokens == {
        "tall": vlm.generate(vlm.chat_prompt("Describe it.", 1), [TALL]),
        "text": vlm.generate(vlm.chat_prompt("Once upon a time", 0), []),
        "blue": vlm.generate(vlm.chat_prompt("What?", 1), [BLUE]),
        "late text": vlm.generate(vlm.chat_prompt("Hello there", 0), []),
    }


def test_a_text_prompt_holding_the_image_token_is_refused(llava):
    engine = llava.engine()
    ids = engine.encode_prompt("look: <image>")
    with pytest.raises(PromptError, match="image token"):
        engine.add([RowRequest(key="sneaky", prompt_ids=ids, params=GREEDY)])
    assert not engine.has_work


def test_a_text_only_model_refuses_images(tiny_model, tokenizer):
    engine = Engine(tiny_model, tokenizer)
    assert not engine.accepts_images
    with pytest.raises(ImagesNotAccepted):
        engine.encode_image_prompts(["What?"], [RED])


def test_a_vision_model_reports_its_chat_template(llava):
    engine = llava.engine()
    assert engine.accepts_images and engine.has_chat_template
    assert (
        engine.encode_prompt("Hi", use_chat_template=True)
        == llava.processor(text=llava.chat_prompt("Hi", 0))["input_ids"][0]
    )


def test_image_rows_beside_a_long_row_equal_hf_generate_with_attention_by_windows(vlm, monkeypatch):
    used = windows_used(monkeypatch)
    engine = vlm.engine(batch_invariant=False)  # the mode groups rows by width instead
    long_text = "word " * 150
    engine.add([RowRequest(key="long", prompt_ids=engine.encode_prompt(long_text), params=GREEDY)])
    tokens: dict[Hashable, list[int]] = {"long": [], "red": [], "tall": []}
    for output in engine.step():
        tokens[output.key].append(output.token_id)
    rows = [
        row(name, engine.encode_image_prompts(["Say it."], [image], use_chat_template=True)[0])
        for name, image in (("red", RED), ("tall", TALL))
    ]
    engine.add(rows)
    while engine.has_work:
        for output in engine.step():
            tokens[output.key].append(output.token_id)
    assert any(used)  # the long row decoded in a window of its own
    assert tokens["red"] == vlm.generate(vlm.chat_prompt("Say it.", 1), [RED])
    assert tokens["tall"] == vlm.generate(vlm.chat_prompt("Say it.", 1), [TALL])
