"""The per-process event hub: one pattern subscription routing events to per-request inboxes."""

import os

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


def test_a_broken_connection_ends_waiting_requests_and_the_hub_reconnects(hub, server, connection):
    waiting = hub.subscribe("r1")
    server.connected = False
    event = waiting.get(2.0)
    assert isinstance(event, events.ErrorEvent)
    assert event.error_type == "redis_unavailable"
    assert event.status == 503
    assert wait_for(lambda: not hub.connected)
    server.connected = True
    assert wait_for(lambda: hub.connected)
    fresh = hub.subscribe("r2")
    publish(connection, "r2", done(0, 0))
    assert fresh.get(1.0) == done(0, 0)


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


def test_generate_fails_with_503_when_the_hub_loses_redis_mid_request(
    client, connection, server, app, worker
):
    add_reader(connection)
    worker.serve(lambda job: [token(0, 0, "a"), lambda job: setattr(server, "connected", False)])
    response = client.post("/generate", json={"text": "a"})
    server.connected = True
    worker.join()
    assert response.status_code == 503
    assert response.get_json()["error_type"] == "redis_unavailable"
