"""Hostile or absurd requests get a clear 4xx, and the app keeps answering."""

from __future__ import annotations

import pytest

from shared import defaults
from tests.support.api_fakes import add_reader


@pytest.fixture(autouse=True)
def _reader(connection):
    add_reader(connection)


def post_raw(client, data: bytes, content_type: str = "application/json"):
    return client.post("/generate", data=data, headers={"Content-Type": content_type})


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"[" * 100_000 + b"]" * 100_000, 400),  # nesting deep enough to break a recursive parser
        (b'{"text": "\xff\xfe\xfd"}', 400),  # not UTF-8
        (b"\x00\x01\x02", 400),
        (b'{"text": "a"', 400),  # truncated
        (b"NaN", 400),
        (b'"just a string"', 422),
        (b"[1, 2, 3]", 422),
    ],
)
def test_unreadable_bodies_are_4xx(client, body, status):
    response = post_raw(client, body)
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.get_json()["error_type"]
    assert client.get("/healthz").status_code == 200


def test_a_huge_prompt_list_is_422(client):
    response = client.post("/generate", json={"text": ["x"] * (defaults.MAX_BATCH_TEXTS + 1)})
    assert response.status_code == 422
    assert str(defaults.MAX_BATCH_TEXTS) in response.get_json()["error"]


def test_absurd_max_new_tokens_is_422(client):
    for value in (10**12, defaults.MAX_NEW_TOKENS_LIMIT + 1):
        response = client.post("/generate", json={"text": "x", "max_new_tokens": value})
        assert response.status_code == 422


def test_max_new_tokens_beyond_the_model_context_is_422(client):
    response = client.post(
        "/generate", json={"text": "x", "max_new_tokens": 4096}
    )  # the reader's context: 2048
    assert response.status_code == 422
    assert "context" in response.get_json()["error"]


def test_a_body_over_the_limit_is_413(make_app):
    from tests.support.api_fakes import INFERENCE_URL
    from tests.unit.api.conftest import client_on

    client = client_on(make_app(body_size_limit_bytes=1000), INFERENCE_URL)
    response = client.post("/generate", json={"text": "x" * 5000})
    assert response.status_code == 413


def test_wrong_types_are_422_naming_the_key(client):
    response = client.post("/generate", json={"text": "x", "sampling_topk": "many", "use_chat_template": []})
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert "sampling_topk" in error and "use_chat_template" in error
