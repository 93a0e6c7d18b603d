from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared import defaults, events
from shared.payload import GenerateRequest


def test_nulls_mean_defaults():
    request = GenerateRequest(
        **{key: None for key in GenerateRequest.model_fields if key != "text"}, text="hi"
    )
    assert request.max_new_tokens == defaults.DEFAULT_MAX_NEW_TOKENS
    assert request.sampling_topk == defaults.DEFAULT_TOPK
    assert request.consumer_group == defaults.DEFAULT_CONSUMER_GROUP


def test_unknown_keys_are_rejected_by_name():
    with pytest.raises(ValidationError) as raised:
        GenerateRequest(text="hi", temperature=0.3)
    assert raised.value.errors()[0]["loc"] == ("temperature",)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_new_tokens", 0),
        ("min_new_tokens", -1),
        ("sampling_temperature", -0.1),
        ("sampling_topp", 0.0),
        ("sampling_topp", 1.5),
        ("sampling_topk", -1),
        ("repetition_penalty", 0),
        ("no_repeat_ngram_size", -2),
        ("prompt_max_tokens", 0),
        ("seed", -5),
        ("consumer_group", "has space"),
        ("text", []),
        ("text", 5),
    ],
)
def test_out_of_range_values_are_rejected(key, value):
    with pytest.raises(ValidationError) as raised:
        GenerateRequest(**{"text": "hi", key: value})
    assert raised.value.errors()[0]["loc"][0] == key


def test_min_new_tokens_may_not_exceed_max_new_tokens():
    with pytest.raises(ValidationError, match="min_new_tokens"):
        GenerateRequest(text="hi", min_new_tokens=10, max_new_tokens=5)


def test_too_many_prompts_are_rejected():
    with pytest.raises(ValidationError, match="at most"):
        GenerateRequest(text=["x"] * (defaults.MAX_BATCH_TEXTS + 1))


def test_json_schema_string_is_parsed():
    assert GenerateRequest(text="x", json_schema='{"type": "object"}').json_schema == {"type": "object"}
    with pytest.raises(ValidationError, match="not valid JSON"):
        GenerateRequest(text="x", json_schema="{nope")


@pytest.mark.parametrize("lora_id", ["alpha", "my-adapter_v2.1"])
def test_lora_ids_are_folder_names(lora_id):
    assert GenerateRequest(text="hi", lora_id=lora_id).lora_id == lora_id


@pytest.mark.parametrize("lora_id", ["", "../up", "a/b", "x" * 129])
def test_lora_ids_that_are_not_folder_names_are_refused(lora_id):
    with pytest.raises(ValidationError, match="lora_id"):
        GenerateRequest(text="hi", lora_id=lora_id)


def test_texts_and_batch_flag():
    assert GenerateRequest(text="a").texts == ["a"] and not GenerateRequest(text="a").is_batch
    assert GenerateRequest(text=["a"]).is_batch


def test_events_round_trip():
    for event in (
        events.TokenEvent(row=1, seq=2, text="a\nb"),
        events.DoneEvent(
            row=0, finish_reason="eos", usage=events.Usage(prompt_tokens=3, completion_tokens=4)
        ),
        events.ErrorEvent(error="bad", error_type="x", status=422),
    ):
        assert events.decode(events.encode(event)) == event


def test_unknown_keys_are_rejected_even_when_null():
    with pytest.raises(ValidationError) as raised:
        GenerateRequest(text="hi", temprature=None)
    assert raised.value.errors()[0]["loc"] == ("temprature",)
