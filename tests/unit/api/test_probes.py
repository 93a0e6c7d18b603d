"""/healthz, /readyz and /metrics."""

import time

from shared import defaults, keys
from tests.support.api_fakes import add_reader


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_healthz_answers_without_redis(client, server):
    server.connected = False
    assert client.get("/healthz").status_code == 200


def test_readyz_without_any_worker(client):
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["ready"] is False
    assert response.get_json()["reasons"] == ["no worker has registered"]


def test_readyz_when_every_group_has_a_ready_worker(client, connection):
    add_reader(connection)
    add_reader(connection, reader_id="v", consumer_group="vision")
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {"ready": True, "reasons": [], "ready_readers": {"primary": 1, "vision": 1}}


def test_readyz_names_each_group_that_cannot_serve(client, connection):
    add_reader(connection)
    add_reader(connection, reader_id="v", consumer_group="vision", ready=False)
    add_reader(connection, reader_id="gone", consumer_group="old")
    connection.delete(keys.reader_key("gone"))
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["reasons"] == [
        "consumer_group 'old' has no live worker",
        "the workers of consumer_group 'vision' are still loading their model",
    ]


def test_readyz_when_redis_is_down(client, server):
    server.connected = False
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["reasons"][0].startswith("redis is unreachable")


def test_metrics_is_prometheus_text_with_redis_gauges(client, connection):
    add_reader(connection)
    add_reader(connection, reader_id="loading", ready=False)
    connection.rpush(f"rq:queue:{keys.queue_name('primary')}", "a", "b", "c")
    client.get("/healthz").close()
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    text = response.get_data(as_text=True)
    assert 'mmserve_queue_depth{consumer_group="primary"} 3.0' in text
    assert 'mmserve_live_readers{consumer_group="primary"} 2.0' in text
    assert 'mmserve_ready_readers{consumer_group="primary"} 1.0' in text
    assert "mmserve_redis_up 1.0" in text
    assert 'mmserve_api_requests_total{method="GET",route="/healthz",status="200"} 1.0' in text
    assert "mmserve_api_open_relays 0.0" in text


def test_metrics_without_redis_still_answer(client, server):
    server.connected = False
    response = client.get("/metrics")
    assert response.status_code == 200
    assert "mmserve_redis_up 0.0" in response.get_data(as_text=True)


def test_each_app_has_its_own_registry(make_app):
    first, second = make_app().test_client(), make_app().test_client()
    first.get("/healthz").close()
    assert 'route="/healthz"' in first.get("/metrics").get_data(as_text=True)
    assert 'route="/healthz"' not in second.get("/metrics").get_data(as_text=True)


def test_a_group_without_workers_for_a_long_time_no_longer_fails_readiness(client, connection):
    add_reader(connection)  # primary: live and ready
    connection.zadd(keys.GROUPS_KEY, {"retired": time.time() - defaults.IDLE_GROUP_SECONDS - 60})
    assert client.get("/readyz").status_code == 200
    assert client.post("/generate", json={"text": "x", "consumer_group": "retired"}).status_code == 503
    connection.zadd(keys.GROUPS_KEY, {"restarting": time.time() - 5})
    response = client.get("/readyz")
    assert response.status_code == 503
    assert any("restarting" in reason for reason in response.get_json()["reasons"])


def test_readyz_with_scale_from_zero_needs_only_redis(make_app, connection):
    client = make_app(scale_from_zero="on").test_client()
    assert client.get("/readyz").status_code == 200  # a fresh install: no worker yet
    add_reader(connection, ready=False)
    add_reader(connection, reader_id="gone", consumer_group="old")
    connection.delete(keys.reader_key("gone"))
    response = client.get("/readyz")
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["ready_readers"] == {"primary": 0, "old": 0}
