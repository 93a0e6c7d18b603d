"""lora_id at the API: admitted only when a live reader of the group has the
adapter (404 otherwise, before anything is queued); the management port lists
every reader's adapters and asks a reader to load one."""

from __future__ import annotations

import pytest

from shared import defaults, keys, reader_calls
from shared.registry import LoraStatus
from tests.support.api_fakes import add_reader, done, serve_one

LORAS = LoraStatus(available=["alpha", "beta"], loaded=["beta"], max_loaded=2)


@pytest.mark.parametrize("route", ["/generate", "/generate_stream"])
def test_a_lora_id_no_reader_has_is_404_and_nothing_is_queued(client, connection, route):
    add_reader(connection, loras=LORAS)
    response = client.post(route, json={"text": "hi", "lora_id": "gamma"})
    assert response.status_code == 404
    body = response.get_json()
    assert body["error_type"] == "unknown_lora"
    assert "'gamma'" in body["error"]
    assert connection.llen(f"rq:queue:{keys.queue_name('primary')}") == 0


def test_a_lora_id_of_a_reader_of_another_group_is_404(client, connection):
    add_reader(connection, consumer_group="other", reader_id="other-1", loras=LORAS)
    add_reader(connection)
    response = client.post("/generate", json={"text": "hi", "lora_id": "alpha"})
    assert response.status_code == 404
    assert response.get_json()["error_type"] == "unknown_lora"


def test_a_lora_id_of_a_dead_reader_is_404(client, connection):
    add_reader(connection, reader_id="dead", loras=LORAS)
    add_reader(connection)
    connection.delete(keys.reader_key("dead"))
    assert client.post("/generate", json={"text": "hi", "lora_id": "alpha"}).status_code == 404


def test_a_known_lora_id_goes_to_the_worker_in_the_job(client, connection, worker):
    add_reader(connection, loras=LORAS)
    worker.serve(lambda job: [done(0, 0)])
    response = client.post("/generate", json={"text": "hi", "lora_id": "alpha"})
    assert response.status_code == 200
    assert worker.jobs[0].request.lora_id == "alpha"


def test_loras_lists_every_live_reader_by_group(management, connection):
    add_reader(connection, reader_id="a", loras=LORAS)
    add_reader(connection, reader_id="b")
    add_reader(connection, reader_id="v", consumer_group="vision")
    assert management.get("/loras").get_json() == {
        "primary": {
            "a": {"available": ["alpha", "beta"], "loaded": ["beta"], "max_loaded": 2},
            "b": {"available": [], "loaded": [], "max_loaded": 0},
        },
        "vision": {"v": {"available": [], "loaded": [], "max_loaded": 0}},
    }


def test_status_and_config_show_a_readers_adapters(management, connection):
    add_reader(connection, loras=LORAS)
    status = management.get("/status").get_json()["live_readers"]["reader-1"]
    assert status["loras"] == LORAS.model_dump()
    assert management.get("/config/reader-1").get_json()["loras"] == LORAS.model_dump()


def test_loading_an_adapter_is_asked_of_that_reader(management, connection):
    add_reader(connection, loras=LORAS)
    received: list = []
    reply = {"ok": True, "result": {"lora_id": "alpha", "load_seconds": 0.12, "loaded": ["beta", "alpha"]}}
    thread = serve_one(connection, reply, received)
    response = management.post("/loras/reader-1", json={"lora_id": "alpha"})
    thread.join()
    assert response.status_code == 200
    assert response.get_json() == {"reader_id": "reader-1", **reply["result"]}
    assert received == [{"tool": "load_lora", "request": {"lora_id": "alpha"}}]


def test_a_readers_refusal_to_load_is_relayed(management, connection):
    add_reader(connection, loras=LORAS)
    reply = {
        "ok": False,
        "status": 422,
        "error": "does not load over this model",
        "error_type": "invalid_lora",
    }
    thread = serve_one(connection, reply, [])
    response = management.post("/loras/reader-1", json={"lora_id": "alpha"})
    thread.join()
    assert response.status_code == 422
    assert response.get_json() == {"error": "does not load over this model", "error_type": "invalid_lora"}


def test_loading_what_the_reader_does_not_have_is_404_without_asking(management, connection):
    add_reader(connection, loras=LORAS)
    response = management.post("/loras/reader-1", json={"lora_id": "gamma"})
    assert response.status_code == 404
    assert response.get_json()["error_type"] == "unknown_lora"
    assert management.post("/loras/nobody", json={"lora_id": "alpha"}).status_code == 404
    assert connection.llen(reader_calls.inbox("reader-1")) == 0


@pytest.mark.parametrize("body", [{}, {"lora_id": "../x"}, {"lora_id": "alpha", "path": "/tmp"}])
def test_a_bad_load_body_is_422(management, connection, body):
    add_reader(connection, loras=LORAS)
    assert management.post("/loras/reader-1", json=body).status_code == 422


def test_a_reader_that_does_not_answer_in_time_is_504(management, connection, monkeypatch):
    add_reader(connection, loras=LORAS)
    monkeypatch.setattr(defaults, "LORA_LOAD_TIMEOUT_SECONDS", 0.2)
    response = management.post("/loras/reader-1", json={"lora_id": "alpha"})
    assert response.status_code == 504
    assert "GET /loras" in response.get_json()["error"]


def test_lora_routes_are_on_the_management_port_only(client, connection):
    add_reader(connection, loras=LORAS)
    assert client.get("/loras").status_code == 404
