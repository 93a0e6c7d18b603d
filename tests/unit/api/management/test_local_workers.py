"""POST /reader and DELETE /reader/{id}: answered by `mmserve serve`'s
supervisor through Redis, 501 when the API runs on its own."""

from __future__ import annotations

import threading

import pytest

from shared import rpc, supervision
from tests.support.api_fakes import MANAGEMENT_URL, add_reader
from tests.unit.api.conftest import client_on


def test_without_a_supervisor_the_api_says_it_cannot_manage_workers(management):
    for response in (management.post("/reader", json={"model_name": "x"}), management.delete("/reader/r-1")):
        assert response.status_code == 501
        assert "mmserve worker" in response.get_json()["error"]


@pytest.fixture
def supervised(make_app, connection):
    """A management client whose API believes it runs under `mmserve serve`, and
    a stand-in supervisor answering one command."""
    client = client_on(make_app(supervisor_id="sup-1"), MANAGEMENT_URL)
    received: list[supervision.Command] = []

    def answer_one(reply: supervision.Reply) -> threading.Thread:
        def run() -> None:
            (call,) = rpc.take(connection, supervision.commands_key("sup-1"), block_seconds=5)
            received.append(supervision.Command.model_validate(call.body))
            supervision.answer(connection, call, reply)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    return client, answer_one, received


def test_post_reader_asks_the_supervisor_to_start_a_worker(supervised):
    client, answer_one, received = supervised
    thread = answer_one(supervision.Reply(ok=True, status=201, reader_id="coder-1234", pid=99))
    takeoff_keys = {"tensor_parallel": 2, "cuda_visible_devices": "0", "quant_type": "int8"}
    body = {"model_name": "some/model", "consumer_group": "coder", **takeoff_keys}
    response = client.post("/reader", json=body)
    thread.join()
    assert response.status_code == 201
    assert response.get_json() == {
        "reader_id": "coder-1234",
        "pid": 99,
        "consumer_group": "coder",
        "ready": False,
        "ignored": ["tensor_parallel"],  # Takeoff's reader keys are taken, those meaning nothing named
    }
    (command,) = received
    assert command.action == "start"
    assert command.spec.model_name == "some/model" and command.spec.consumer_group == "coder"
    assert command.spec.environment() == {"CUDA_VISIBLE_DEVICES": "0"}
    assert command.spec.worker_overrides()["quantize"] == "int8"


def test_post_reader_with_unknown_keys_is_422(supervised):
    client, _, _ = supervised
    response = client.post("/reader", json={"model_name": "m", "gpu_memory": 3})
    assert response.status_code == 422
    assert "gpu_memory" in response.get_json()["error"]


def test_delete_reader_asks_the_supervisor_to_stop_it(supervised, connection):
    client, answer_one, received = supervised
    add_reader(connection, reader_id="primary-abcd")
    thread = answer_one(supervision.Reply(ok=True, reader_id="primary-abcd", pid=7))
    response = client.delete("/reader/primary-abcd")
    thread.join()
    assert response.status_code == 200
    assert received[0].action == "stop" and received[0].reader_id == "primary-abcd"


def test_delete_of_an_unknown_reader_is_404(supervised):
    client, _, _ = supervised
    assert client.delete("/reader/nobody").status_code == 404


def test_a_refusal_from_the_supervisor_is_relayed(supervised, connection):
    client, answer_one, _ = supervised
    add_reader(connection, reader_id="remote-1")
    thread = answer_one(supervision.Reply(ok=False, status=409, error="not started by this serve"))
    response = client.delete("/reader/remote-1")
    thread.join()
    assert response.status_code == 409
    assert "not started" in response.get_json()["error"]
