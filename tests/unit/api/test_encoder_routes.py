"""Takeoff's embedding and classification routes and OpenAI's embeddings route answer 501,
saying what is not supported, in each port's error shape, never 404 or 500."""

from __future__ import annotations

from tests.unit.api.conftest import client_on
from tests.unit.api.openai.conftest import OPENAI_URL


def test_takeoff_embed_and_classify_say_they_are_not_supported_yet(client):
    for route, body in (
        ("/embed", {"text": "hi"}),
        ("/classify", {"text": [["q", "d"]], "consumer_group": "c"}),
    ):
        response = client.post(route, json=body)
        assert response.status_code == 501, route
        answer = response.get_json()
        assert answer["error_type"] == "not_implemented" and "not supported yet" in answer["error"]


def test_openai_embeddings_says_so_in_openais_shape(app):
    response = client_on(app, OPENAI_URL).post("/v1/embeddings", json={"input": "hi", "model": "primary"})
    assert response.status_code == 501
    error = response.get_json()["error"]
    assert "embedding" in error["message"] and "not supported yet" in error["message"]
