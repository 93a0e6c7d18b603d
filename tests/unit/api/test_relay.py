"""The per-process event hub: one pattern subscription routing events to per-request inboxes."""

import os
import time

import fakeredis
import pytest
import redis

from api import relay
from api.relay import EventHub
from shared import events, keys
from tests.support.api_fakes import add_reader, done, token, wait_for


@pytest.fixture
def hub(connection):
    hub = EventHub(connection, subscribe_timeout_seconds=1.0, poll_seconds=0.05)
    yield hub
    hub.stop()


def publish(connection, request_id, event):
    connection.publish(keys.events_channel(request_id), events.encode(event))


def test_the_hub_starts_on_first_subscribe(hub):
    assert not hub.started
    hub.subscribe("r1")
    assert hub.started and hub.connected


def test_events_reach_only_their_own_request(hub, connection):
    first, second = hub.subscribe("r1"), hub.subscribe("r2")
    publish(connection, "r2", token(0, 0, "for r2"))
    publish(connection, "r1", token(0, 0, "for r1"))
    assert first.get(1.0) == token(0, 0, "for r1")
    assert second.get(1.0) == token(0, 0, "for r2")
    assert first.get(0.05) is None


def test_events_of_unregistered_requests_are_dropped(hub, connection):
    subscription = hub.subscribe("mine")
    publish(connection, "someone-else", token(0, 0, "x"))
    publish(connection, "mine", done(0, 0))
    assert subscription.get(1.0) == done(0, 0)
    assert subscription.get(0.05) is None


def test_a_closed_subscription_receives_nothing_more(hub, connection):
    subscription = hub.subscribe("r1")
    assert hub.open_subscriptions == 1
    subscription.close()
    subscription.close()
    assert hub.open_subscriptions == 0
    publish(connection, "r1", token(0, 0, "late"))
    assert subscription.get(0.1) is None


def test_malformed_messages_are_dropped(hub, connection):
    subscription = hub.subscribe("r1")
    connection.publish(keys.events_channel("r1"), b"not json")
    connection.publish(keys.events_channel("r1"), b'{"type": "token", "row": 0}')
    publish(connection, "r1", done(0, 1))
    assert subscription.get(1.0) == done(0, 1)


def test_after_losing_redis_the_hub_reconnects_and_tells_waiting_requests(hub, server, connection):
    waiting = hub.subscribe("r1")
    server.connected = False
    assert wait_for(lambda: not hub.connected)
    assert waiting.get(0.2) is None  # nothing yet: the request waits for Redis
    server.connected = True
    assert wait_for(lambda: hub.connected)
    assert waiting.get(1.0) == relay.EventsMissed()
    publish(connection, "r1", token(0, 0, "after"))
    assert waiting.get(1.0) == token(0, 0, "after")
    fresh = hub.subscribe("r2")
    publish(connection, "r2", done(0, 0))
    assert fresh.get(1.0) == done(0, 0)
    assert fresh.get(0.05) is None  # it was not waiting through the outage


def test_requests_waiting_through_a_long_outage_end_with_an_error(server, connection):
    hub = EventHub(connection, subscribe_timeout_seconds=1.0, poll_seconds=0.05, outage_patience_seconds=0.3)
    try:
        waiting = hub.subscribe("r1")
        server.connected = False
        event = waiting.get(3.0)
        assert isinstance(event, events.ErrorEvent)
        assert event.error_type == "redis_unavailable" and event.status == 503
        server.connected = True
        assert wait_for(lambda: hub.connected)
        assert waiting.get(0.2) is None  # no EventsMissed after it was ended
    finally:
        hub.stop()


def test_subscribing_while_redis_is_down_fails_within_the_subscribe_timeout(server, connection):
    server.connected = False
    hub = EventHub(connection, subscribe_timeout_seconds=0.2, poll_seconds=0.05)
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            hub.subscribe("r1")
        assert hub.open_subscriptions == 0
    finally:
        server.connected = True
        hub.stop()


def test_stopping_ends_waiting_requests(connection):
    hub = EventHub(connection, poll_seconds=5.0)
    subscription = hub.subscribe("r1")
    hub.stop(timeout=1.0)
    event = subscription.get(0.1)
    assert isinstance(event, events.ErrorEvent)
    assert not hub._runtime.thread.is_alive()


def test_a_forked_process_starts_its_own_hub(hub, monkeypatch):
    hub.subscribe("r1")
    parent = hub._runtime
    real_pid = os.getpid()
    monkeypatch.setattr(relay.os, "getpid", lambda: real_pid + 1)
    assert not hub.started
    hub.subscribe("r2")
    child = hub._runtime
    assert child is not parent
    assert child.thread is not parent.thread
    assert child.inboxes.by_channel.keys() == {keys.events_channel("r2")}
    hub.stop()  # the child's hub
    parent.stopping.set()  # the parent's thread, which a real fork would not have copied
    parent.thread.join(1.0)
    assert not parent.thread.is_alive() and not child.thread.is_alive()


def test_one_pubsub_connection_serves_many_requests(hub, server):
    subscriptions = [hub.subscribe(f"r{i}") for i in range(20)]
    observer = fakeredis.FakeRedis(server=server)
    assert observer.pubsub_numpat() == 1
    for subscription in subscriptions:
        subscription.close()


def outage(server, seconds: float = 1.5):
    """A fake-worker step: Redis is away for `seconds` (the hub notices and reconnects)."""

    def step(job) -> None:
        server.connected = False
        time.sleep(seconds)
        server.connected = True

    return step


def done_after(row: int, token_events: int) -> events.DoneEvent:
    event = done(row, token_events)
    return event.model_copy(update={"token_events": token_events})


def test_a_job_run_again_after_redis_came_back_completes_the_answer(client, connection, server, worker):
    add_reader(connection)
    rerun = [token(0, 0, "a"), token(0, 1, "b"), token(0, 2, "c"), done_after(0, 3)]
    worker.serve(lambda job: [token(0, 0, "a"), outage(server), 0.3, *rerun])
    response = client.post("/generate", json={"text": "x"})
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["text"] == "abc"


def test_tokens_lost_while_redis_was_away_end_the_request(client, connection, server, worker):
    add_reader(connection)
    worker.serve(lambda job: [token(0, 0, "a"), outage(server), 0.3, token(0, 2, "c"), done_after(0, 3)])
    response = client.post("/generate", json={"text": "x"})
    assert response.status_code == 503
    assert response.get_json()["error_type"] == "redis_unavailable"
    assert "missing" in response.get_json()["error"]


def test_a_last_token_lost_while_redis_was_away_ends_the_request(client, connection, server, worker):
    add_reader(connection)
    worker.serve(lambda job: [token(0, 0, "a"), outage(server), 0.3, done_after(0, 2)])
    response = client.post("/generate", json={"text": "x"})
    assert response.status_code == 503
    assert response.get_json()["error_type"] == "redis_unavailable"


def test_a_job_gone_after_redis_came_back_ends_the_request_at_once(client, connection, server, worker):
    add_reader(connection)

    def lose_the_job(job) -> None:
        connection.delete(f"rq:job:{job.request_id}")

    worker.serve(lambda job: [token(0, 0, "a"), lose_the_job, outage(server)])
    started = time.monotonic()
    response = client.post("/generate", json={"text": "x"})
    assert response.status_code == 503
    assert "gone" in response.get_json()["error"]
    assert time.monotonic() - started < 5.0  # not the 5 s next-event timeout


def test_a_job_that_ended_while_redis_was_away_ends_the_request_after_a_grace(
    client, connection, server, worker
):
    add_reader(connection)

    def finish(job) -> None:
        connection.hset(f"rq:job:{job.request_id}", "status", "finished")

    worker.serve(lambda job: [token(0, 0, "a"), finish, outage(server)])
    started = time.monotonic()
    response = client.post("/generate", json={"text": "x"})
    assert response.status_code == 503
    assert "ended" in response.get_json()["error"]
    assert time.monotonic() - started < 5.0
