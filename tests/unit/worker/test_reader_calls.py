from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from worker.reader_calls import answer


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer_dir):
    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


def test_tokenize_then_detokenize_round_trips(tokenizer):
    tokens = answer(tokenizer, "tokenize", {"text": "Fish is very nutritious."})["result"]
    assert tokens["tokens_count"] == len(tokens["tokens"]) == len(tokens["token_ids"]) > 1
    by_ids = answer(tokenizer, "detokenize", {"tokens": tokens["token_ids"]})["result"]
    by_strings = answer(tokenizer, "detokenize", {"tokens": tokens["tokens"]})["result"]
    assert by_ids == by_strings == {"text": "Fish is very nutritious."}


def test_tokenize_with_the_chat_template_adds_the_turn_markers(tokenizer):
    plain = answer(tokenizer, "tokenize", {"text": "Hi"})["result"]["tokens"]
    chat = answer(tokenizer, "tokenize", {"text": "Hi", "use_chat_template": True})["result"]["tokens"]
    assert len(chat) > len(plain) and "<|im_start|>" in chat


def test_chat_template_formats_each_conversation(tokenizer):
    conversation = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi!"}]
    result = answer(
        tokenizer,
        "chat_template",
        {"inputs": [conversation, conversation[:1]], "add_generation_prompt": True},
    )["result"]
    first, second = result["messages"]
    assert "Hello?" in first and "Hi!" in first
    assert second.rstrip().endswith("assistant")


def test_bad_requests_are_refused_with_a_status(tokenizer):
    assert answer(tokenizer, "detokenize", {"tokens": [10**9]})["status"] == 400
    assert answer(tokenizer, "tokenize", {"txt": "x"})["status"] == 422
    assert answer(tokenizer, "translate", {})["status"] == 404
