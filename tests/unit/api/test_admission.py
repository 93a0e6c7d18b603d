"""Which group serves a valid payload, and when it cannot: 404, 503, 422, 429."""

import time

import pytest

from shared import defaults, keys
from tests.support.api_fakes import add_reader, done, token

ROUTES = ["/generate", "/generate_stream"]


@pytest.mark.parametrize("route", ROUTES)
def test_unknown_group_is_404(client, connection, route):
    add_reader(connection)
    response = client.post(route, json={"text": "hi", "consumer_group": "nope"})
    assert response.status_code == 404
    assert response.get_json()["error_type"] == "unknown_consumer_group"
    assert "'nope'" in response.get_json()["error"]


def test_no_worker_ever_is_404(client):
    response = client.post("/generate", json={"text": "hi"})
    assert response.status_code == 404


@pytest.mark.parametrize("route", ROUTES)
def test_group_without_live_reader_is_503_with_retry_after(client, connection, route):
    add_reader(connection)
    connection.delete(keys.reader_key("reader-1"))  # its heartbeat expired
    response = client.post(route, json={"text": "hi"})
    assert response.status_code == 503
    assert response.get_json()["error_type"] == "no_live_reader"
    assert int(response.headers["Retry-After"]) > 0


def test_group_whose_readers_are_loading_is_503(client, connection):
    add_reader(connection, ready=False)
    response = client.post("/generate", json={"text": "hi"})
    assert response.status_code == 503
    assert "still loading" in response.get_json()["error"]
    assert "Retry-After" in response.headers


def test_max_new_tokens_beyond_every_readers_context_is_422(client, connection):
    add_reader(connection, context_length=100)
    add_reader(connection, reader_id="reader-2", context_length=200)
    response = client.post("/generate", json={"text": "hi", "max_new_tokens": 201})
    assert response.status_code == 422
    assert "max_new_tokens (201) exceeds the context length" in response.get_json()["error"]


def test_context_length_is_not_checked_when_a_reader_does_not_report_it(client, connection, worker):
    add_reader(connection, context_length=100)
    add_reader(connection, reader_id="reader-2", context_length=None)
    worker.serve(lambda job: [done(0, 0)])
    assert client.post("/generate", json={"text": "hi", "max_new_tokens": 500}).status_code == 200


def test_chat_template_without_any_reader_having_one_is_422(client, connection):
    add_reader(connection, has_chat_template=False)
    response = client.post("/generate", json={"text": "hi", "use_chat_template": True})
    assert response.status_code == 422
    assert "use_chat_template" in response.get_json()["error"]


@pytest.mark.parametrize("route", ROUTES)
def test_full_queue_is_429_with_retry_after(make_app, connection, route):
    add_reader(connection)
    client = make_app(max_queue_depth=2).test_client()
    queue_key = f"rq:queue:{keys.queue_name('primary')}"
    connection.rpush(queue_key, "waiting-1", "waiting-2")
    response = client.post(route, json={"text": "hi"})
    assert response.status_code == 429
    assert response.get_json()["error_type"] == "queue_full"
    assert int(response.headers["Retry-After"]) > 0


def test_queue_below_the_limit_admits(make_app, connection, worker):
    add_reader(connection)
    client = make_app(max_queue_depth=2).test_client()
    connection.rpush(f"rq:queue:{keys.queue_name('primary')}", "waiting-1")
    worker.serve(lambda job: [done(0, 0)])
    assert client.post("/generate", json={"text": "hi"}).status_code == 200


@pytest.mark.parametrize("route", ROUTES)
def test_unreachable_redis_is_a_fast_503(client, server, route):
    server.connected = False
    started = time.monotonic()
    response = client.post(route, json={"text": "hi"})
    assert response.status_code == 503
    assert response.get_json()["error_type"] == "redis_unavailable"
    assert response.headers["Retry-After"] == str(defaults.RETRY_AFTER_REDIS_UNAVAILABLE_SECONDS)
    assert time.monotonic() - started < defaults.REDIS_SOCKET_TIMEOUT_SECONDS


@pytest.mark.parametrize("ready", [False, None])  # loading, or scaled to zero (no live worker)
def test_with_scale_from_zero_a_group_without_a_ready_worker_queues_and_waits(
    make_app, connection, worker, ready
):
    client = make_app(scale_from_zero="on").test_client()
    add_reader(connection, ready=bool(ready))
    if ready is None:
        connection.delete(keys.reader_key("reader-1"))  # its heartbeat expired: scaled to zero
    # The worker that starts later answers; checks the readers would make wait for it.
    worker.serve(lambda job: [0.3, token(0, 0, "woken"), done(0, 1, "stop")])
    response = client.post("/generate", json={"text": "hi", "max_new_tokens": 5000})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["text"] == "woken"
    worker.join()


def test_with_scale_from_zero_an_unknown_group_is_still_404(make_app, connection):
    client = make_app(scale_from_zero="on").test_client()
    add_reader(connection)
    assert client.post("/generate", json={"text": "hi", "consumer_group": "nope"}).status_code == 404
