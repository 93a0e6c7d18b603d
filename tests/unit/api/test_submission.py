"""api.submission.start_generation, the one path both route families take from a
checked request to a queued job: images are loaded only once the request is
admitted, and a request whose job cannot be queued leaves no image and no open
inbox behind, whichever family it came through."""

from __future__ import annotations

import io
import json

import pytest
import redis
from PIL import Image

from api.state import state_of
from shared import jobs, keys
from tests.support.api_fakes import INFERENCE_URL, add_reader
from tests.unit.api.conftest import client_on
from tests.unit.api.openai.conftest import OPENAI_URL, png_data_uri

PROMPT = {"text": "What is in the picture?", "max_new_tokens": 5}


def red_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def image_generate(client, payload: dict):
    return client.post(
        "/image_generate",
        data={
            "image_data": (io.BytesIO(red_png()), "red.png", "image/png"),
            "json_data": json.dumps(payload),
        },
        content_type="multipart/form-data",
    )


def image_chat(client, url: str):
    content = [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": url}}]
    return client.post(
        "/v1/chat/completions", json={"model": "primary", "messages": [{"role": "user", "content": content}]}
    )


def stored_images(connection) -> list[bytes]:
    return list(connection.scan_iter(keys.image_key("*")))


def test_an_image_path_is_not_read_when_admission_refuses_the_request(client, connection):
    add_reader(connection, model_type="VISION")
    payload = {**PROMPT, "consumer_group": "nobody", "image_paths": ["missing.png"]}
    response = client.post("/generate", json=payload)
    # Read first, it would be a 400 (this server reads no local image files).
    assert response.status_code == 404
    assert response.get_json()["error_type"] == "unknown_consumer_group"


def test_an_image_url_is_not_decoded_when_admission_refuses_the_request(app, connection):
    add_reader(connection)  # text-only
    response = image_chat(client_on(app, OPENAI_URL), "data:image/png;base64,!!!")
    # Decoded first, it would be invalid_image.
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "model_does_not_accept_images"


@pytest.fixture
def queue_down(monkeypatch):
    def refuse(queue, job, reader_queue=None):
        raise redis.exceptions.ConnectionError("the queue is down")

    monkeypatch.setattr(jobs, "enqueue", refuse)


@pytest.mark.usefixtures("queue_down")
def test_a_takeoff_request_that_cannot_be_queued_leaves_nothing_behind(app, connection):
    add_reader(connection, model_type="VISION")
    response = image_generate(client_on(app, INFERENCE_URL), PROMPT)
    assert response.status_code == 503
    assert response.get_json()["error_type"] == "redis_unavailable"
    assert stored_images(connection) == []
    assert state_of(app).hub.open_subscriptions == 0


@pytest.mark.usefixtures("queue_down")
def test_an_openai_request_that_cannot_be_queued_leaves_nothing_behind(app, connection):
    add_reader(connection, model_type="VISION")
    response = image_chat(client_on(app, OPENAI_URL), png_data_uri())
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "redis_unavailable"
    assert stored_images(connection) == []
    assert state_of(app).hub.open_subscriptions == 0
