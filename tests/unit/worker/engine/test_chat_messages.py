"""Prompts built from a whole conversation (GenerationJob.messages, sent by the
OpenAI chat route): the model's chat template over every turn."""

from __future__ import annotations

import pytest
from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.support.tiny_vlms import sample_image
from worker.engine.engine import Engine, PromptError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Again"},
]


def test_messages_are_rendered_by_the_tokenizers_chat_template(engine, tokenizer):
    expected = tokenizer.apply_chat_template(
        CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert engine.encode_prompt("", messages=CONVERSATION) == list(expected)
    assert "Hello!" in tokenizer.decode(engine.encode_prompt("", messages=CONVERSATION))


def test_one_user_message_equals_use_chat_template(engine):
    single = [{"role": "user", "content": "Hi"}]
    assert engine.encode_prompt("", messages=single) == engine.encode_prompt("Hi", use_chat_template=True)


@pytest.fixture(scope="module")
def llava_engine(tiny_llava_dir) -> Engine:
    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir).eval()
    return Engine(model, processor.tokenizer, processor=processor)


def test_a_vision_conversation_places_its_image_parts(llava_engine):
    red = sample_image((220, 30, 30))
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    (from_messages,) = llava_engine.encode_image_prompts([""], [red], messages=turn)
    (from_text,) = llava_engine.encode_image_prompts(["What?"], [red], use_chat_template=True)
    assert from_messages.prompt_ids == from_text.prompt_ids
    longer = [*CONVERSATION[:3], turn[0]]
    (prompt,) = llava_engine.encode_image_prompts([""], [red], messages=longer)
    assert "Hello!" in llava_engine.tokenizer.decode(prompt.prompt_ids)
    text_only = llava_engine.encode_prompt("", messages=CONVERSATION)
    assert "Be brief." in llava_engine.tokenizer.decode(text_only)


def test_image_parts_must_match_the_images(llava_engine):
    red = sample_image((220, 30, 30))
    with pytest.raises(PromptError, match="image part"):
        llava_engine.encode_image_prompts([""], [red], messages=CONVERSATION)
