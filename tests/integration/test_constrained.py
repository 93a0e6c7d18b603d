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
    for backend in ("outlines", "xgrammar", "llguidance"):
        check_json_schema(server, backend)


def check_json_schema(server, backend: str) -> None:
    payload = {
        "text": "Describe a person as JSON.",
        "json_schema": SCHEMA,
        "constrained_decoding_backend": backend,
        "max_new_tokens": 60,
        "return_metadata": True,
        "seed": 3,
        **SAMPLED,
    }
    response = requests.post(server.url + "/generate", json=payload)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["metadata"]["finish_reason"] == "stop", body
    jsonschema.validate(json.loads(body["text"]), SCHEMA)
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
    # max_new_tokens before the grammar completes: "length", output possibly incomplete
    short = {"text": "x", "regex_string": "[a-z]{30}", "max_new_tokens": 3, "return_metadata": True}
    body = requests.post(server.url + "/generate", json=short).json()
    assert body["metadata"]["finish_reason"] == "length"
    assert re.fullmatch("[a-z]*", body["text"])
    # a schema the backend would not enforce never reaches the worker
    response = requests.post(
        server.url + "/generate", json={"text": "x", "json_schema": {"type": "integer", "minimum": 3}}
    )
    assert response.status_code == 400
    assert response.json()["error_type"] == "invalid_constraint"
    assert "minimum" in response.json()["error"]
