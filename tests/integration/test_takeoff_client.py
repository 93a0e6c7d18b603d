"""The published Takeoff Python client, unchanged, against mmserve."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest
from takeoff_client import TakeoffClient
from takeoff_client.exceptions import TakeoffException

pytestmark = pytest.mark.integration


@pytest.fixture
def client(shared_server) -> TakeoffClient:
    api = shared_server
    return TakeoffClient(
        base_url="http://127.0.0.1",
        port=urlsplit(api.url).port,
        mgmt_port=urlsplit(api.management_url).port,
    )


def test_generate_and_stream_agree(client):
    whole = client.generate("Tell me about", max_new_tokens=10, return_metadata=True)
    assert whole["metadata"]["completion_tokens"] <= 10
    events = list(client.generate_stream("Tell me about", max_new_tokens=10))
    assert "".join(event.data for event in events if event.event == "message") == whole["text"]


def test_batch_generate_and_stream(client):
    prompts = ["one", "two"]
    whole = client.generate(prompts, max_new_tokens=6)["text"]
    assert isinstance(whole, list) and len(whole) == 2
    texts = ["", ""]
    for event in client.generate_stream(prompts, max_new_tokens=6):
        payload = json.loads(event.data)
        texts[payload["batch_id"]] += payload["text"]
    assert texts == whole


def test_management_calls(client):
    readers = client.get_readers()
    (reader,) = readers["primary"]
    assert client.get_reader_config(reader["reader_id"])["reader_id"] == reader["reader_id"]
    assert reader["reader_id"] in client.get_status()["live_readers"]


def test_errors_surface_as_takeoff_exceptions(client):
    with pytest.raises(TakeoffException) as raised:
        client.generate("x", consumer_group="missing")
    assert raised.value.status_code == 404


def test_tokenizer_routes(client):
    (reader,) = client.get_readers()["primary"]
    reader_id = reader["reader_id"]
    tokens = client.tokenize("hello, world", reader_id=reader_id, use_chat_template=False)
    assert client.tokens_count("hello, world", reader_id=reader_id) == len(tokens)
    assert client.detokenize(tokens, reader_id=reader_id) == "hello, world"
    (formatted,) = client.chat_template(
        [{"role": "user", "content": "Hi"}], reader_id=reader_id, add_generation_prompt=True
    )
    assert "Hi" in formatted
