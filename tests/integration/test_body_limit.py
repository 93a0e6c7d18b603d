"""Bodies over --body-size-limit-bytes, sent by ordinary clients to the API under gunicorn:
each gets the 413 JSON answer, on every port, whether it gives a Content-Length or is
chunked; a body past the discard bound is cut off instead of read."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request

import pytest
import requests

LIMIT = 2 * 1024 * 1024
DISCARD = 64 * 1024 * 1024
OVER = 8 * 1024 * 1024  # past the limit, within the discard bound


@pytest.fixture(scope="module")
def api(redis_server, tiny_model_dir, tmp_path_factory):
    from tests.integration.conftest import Launcher

    launched = Launcher(redis_server.url, tiny_model_dir, tmp_path_factory.mktemp("body-limit"))
    yield launched.api("--body-size-limit-bytes", str(LIMIT), "--discard-body-limit-bytes", str(DISCARD))
    launched.stop_all()


def big_json(size: int) -> bytes:
    return json.dumps({"text": "x" * size}).encode()


def test_requests_reads_the_413(api):
    response = requests.post(
        api.url + "/generate", data=big_json(OVER), headers={"Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code == 413
    assert response.json()["error_type"] == "payload_too_large"


def test_urllib_reads_the_413(api):
    request = urllib.request.Request(
        api.url + "/generate_stream", data=big_json(OVER), headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=30)
    assert raised.value.code == 413
    assert json.loads(raised.value.read())["error_type"] == "payload_too_large"


def test_a_chunked_body_gets_the_413(api):
    def chunks():
        piece = b"x" * 65536
        yield b'{"text": "'
        for _ in range(OVER // len(piece)):
            yield piece
        yield b'"}'

    response = requests.post(
        api.url + "/generate", data=chunks(), headers={"Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code == 413
    assert response.json()["error_type"] == "payload_too_large"


def test_multipart_gets_the_413(api):
    files = {
        "image_data": ("big.png", b"\x89PNG" + b"\0" * OVER, "image/png"),
        "json_data": (None, '{"text": "hi"}'),
    }
    response = requests.post(api.url + "/image_generate", files=files, timeout=30)
    assert response.status_code == 413
    assert response.json()["error_type"] == "payload_too_large"


def test_the_openai_port_answers_in_its_shape(api):
    body = json.dumps({"model": "primary", "messages": [{"role": "user", "content": "x" * OVER}]}).encode()
    response = requests.post(
        api.openai_url + "/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413
    assert "error" in response.json()


def test_the_management_port_too(api):
    response = requests.post(
        api.management_url + "/reader",
        data=big_json(OVER),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413


def test_the_connection_serves_the_next_request_or_is_closed(api):
    """After a 413 the server either keeps the connection usable or says it closes it."""
    parsed = urllib.parse.urlsplit(api.url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    connection.request("POST", "/generate", body=big_json(OVER), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 413
    response.read()
    if response.getheader("Connection", "").lower() == "close":
        return
    connection.request("GET", "/healthz")
    assert connection.getresponse().status == 200


def test_past_the_discard_bound_the_connection_is_cut(api):
    """Nothing past the bound is read: the server hangs up long before the client is done."""
    parsed = urllib.parse.urlsplit(api.url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
    size = 64 * DISCARD
    connection.putrequest("POST", "/generate")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(size))
    connection.endheaders()
    piece = b"x" * 65536
    sent = 0
    with pytest.raises(ConnectionError):  # reset or broken pipe; not a timeout
        while sent < size:
            connection.send(piece)
            sent += len(piece)
    assert sent < 2 * DISCARD
