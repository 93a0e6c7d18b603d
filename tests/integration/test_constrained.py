"""Constrained decoding over HTTP: API -> Redis/RQ -> worker (tiny random model) -> SSE."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import requests

from bench.sse import read_stream

pytestmark = pytest.mark.integration

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{2,4}$"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
# xgrammar and llguidance cannot finish an answer early: they get constraints whose answers are bounded.
BOUNDED_SCHEMA = {
    **SCHEMA,
    "properties": {**SCHEMA["properties"], "age": {"type": "integer", "minimum": 0, "maximum": 120}},
}
BOUNDED_BUDGET = 100
# The example: a free string the model can run on with.
NOTE_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "note": {"type": ["string", "null"]}},
    "required": ["ok", "note"],
}
DATE = r"\d{4}-\d{2}-\d{2}"
SAMPLED = {"sampling_temperature": 1.0, "sampling_topk": 0}


@pytest.fixture
def server(shared_server):
    return shared_server


def streamed(url: str, payload: dict) -> tuple[str, dict | None]:
    with requests.post(url + "/generate_stream", json=payload, stream=True) as response:
        assert response.status_code == 200, response.text
        events = read_stream(response)
    text = "".join(event.data for event in events if event.event == "message")
    metadata = [event.json() for event in events if event.event == "metadata"]
    return text, metadata[0] if metadata else None


def test_json_schema_output_validates_stops_and_streams_the_same(server):
    check_json_schema(server, "outlines", SCHEMA, 60)
    for backend in ("xgrammar", "llguidance"):
        check_json_schema(server, backend, BOUNDED_SCHEMA, BOUNDED_BUDGET)


def check_json_schema(server, backend: str, schema: dict, max_new_tokens: int) -> None:
    payload = {
        "text": "Describe a person as JSON.",
        "json_schema": schema,
        "constrained_decoding_backend": backend,
        "max_new_tokens": max_new_tokens,
        "return_metadata": True,
        "seed": 3,
        **SAMPLED,
    }
    response = requests.post(server.url + "/generate", json=payload)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["metadata"]["finish_reason"] == "stop", body
    assert body["metadata"]["closed_early"] is False
    jsonschema.validate(json.loads(body["text"]), schema)
    text, metadata = streamed(server.url, payload)
    assert text == body["text"]
    assert metadata["finish_reason"] == "stop"


def test_regex_stream_equals_generate_for_a_batch(server):
    payload = {
        "text": ["Today is", "A date:"],
        "regex_string": DATE,
        "max_new_tokens": 20,
        "seed": 5,
        **SAMPLED,
    }
    answer = requests.post(server.url + "/generate", json=payload).json()
    assert all(re.fullmatch(DATE, text, re.ASCII) for text in answer["text"])
    with requests.post(server.url + "/generate_stream", json=payload, stream=True) as response:
        events = read_stream(response)
    texts = ["", ""]
    for event in events:
        texts[event.json()["batch_id"]] += event.json()["text"]
    assert texts == answer["text"]

    # regex_string wins over json_schema (here a JSON string)
    both = {
        "text": "x",
        "json_schema": json.dumps(SCHEMA),
        "regex_string": "(yes|no)",
        "return_metadata": True,
    }
    body = requests.post(server.url + "/generate", json=both).json()
    assert body["text"] in ("yes", "no") and body["metadata"]["finish_reason"] == "stop"
    # max_new_tokens below the shortest answer: refused by the worker, naming both numbers
    short = {"text": "x", "regex_string": "(ab ){30}", "max_new_tokens": 3, "return_metadata": True}
    response = requests.post(server.url + "/generate", json=short)
    assert response.status_code == 400, response.text
    assert "max_new_tokens 3 is too few" in response.json()["error"]
    # a schema the backend would not enforce never reaches the worker
    response = requests.post(
        server.url + "/generate", json={"text": "x", "json_schema": {"type": "integer", "minimum": 3}}
    )
    assert response.status_code == 400
    assert response.json()["error_type"] == "invalid_constraint"
    assert "minimum" in response.json()["error"]


@pytest.mark.parametrize("route", ["/generate", "/generate_stream"])
def test_an_answer_max_new_tokens_would_cut_is_closed_and_parses(server, route):
    # Sampled at temperature 1.0 the tiny random model runs on inside "note";
    # the budget makes every answer finish as valid JSON, reported as length.
    payload = {
        "text": [f"Is it fine? ({seed})" for seed in range(6)],
        "json_schema": NOTE_SCHEMA,
        "max_new_tokens": 16,
        "return_metadata": True,
        "seed": 11,
        **SAMPLED,
    }
    if route == "/generate":
        body = requests.post(server.url + route, json=payload).json()
        texts, metadata = body["text"], body["metadata"]
    else:
        with requests.post(server.url + route, json=payload, stream=True) as response:
            events = read_stream(response)
        texts = [""] * 6
        for event in events:
            if event.event == "message":
                texts[event.json()["batch_id"]] += event.json()["text"]
        metadata = next(event.json() for event in events if event.event == "metadata")
    for text in texts:
        jsonschema.validate(json.loads(text), NOTE_SCHEMA)
    closed = [row for row in metadata if row["closed_early"]]
    assert closed, metadata
    assert all(row["finish_reason"] == "length" and row["completion_tokens"] <= 16 for row in closed)


def test_a_backend_that_cannot_close_is_refused_an_unbounded_schema(server):
    payload = {"text": "x", "json_schema": NOTE_SCHEMA, "constrained_decoding_backend": "xgrammar"}
    response = requests.post(server.url + "/generate", json=payload)
    assert response.status_code == 400
    assert "outlines" in response.json()["error"] and "no length bound" in response.json()["error"]
