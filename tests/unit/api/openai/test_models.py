"""GET /v1/models and /v1/models/{model}, and how a request's `model` names a
consumer group or one of its LoRA adapters."""

from __future__ import annotations

import pytest

from shared.registry import LoraStatus
from tests.support.api_fakes import FakeWorker, add_reader
from tests.unit.api.openai.conftest import chat, hello


def test_an_unknown_model_is_404_model_not_found(openai):
    response = openai.post("/v1/chat/completions", json=chat(model="gpt-4o"))
    assert response.status_code == 404
    error = response.get_json()["error"]
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert "primary" in error["message"]


def test_models_lists_every_consumer_group(openai, connection):
    add_reader(connection, reader_id="coder-1", consumer_group="coder", model_name="tiny-coder")
    body = openai.get("/v1/models").get_json()
    assert body["object"] == "list"
    assert {entry["id"]: entry["root"] for entry in body["data"]} == {
        "primary": "tiny-test-model",
        "coder": "tiny-coder",
    }
    assert openai.get("/v1/models/coder").get_json()["id"] == "coder"
    assert openai.get("/v1/models/nope").status_code == 404


def test_models_lists_each_groups_lora_adapters(openai, connection):
    loras = LoraStatus(available=["alpha", "beta"], max_loaded=2)
    add_reader(connection, reader_id="coder-1", consumer_group="coder", model_name="tiny-coder", loras=loras)
    body = openai.get("/v1/models").get_json()
    entries = {entry["id"]: entry for entry in body["data"]}
    assert list(entries) == ["coder", "coder/alpha", "coder/beta", "primary"]
    assert entries["coder/alpha"]["parent"] == "coder" and entries["coder/alpha"]["root"] == "alpha"
    assert openai.get("/v1/models/coder/beta").get_json()["id"] == "coder/beta"
    assert openai.get("/v1/models/beta").get_json()["id"] == "coder/beta"
    assert openai.get("/v1/models/coder/gamma").status_code == 404
    assert openai.get("/v1/models/primary/alpha").status_code == 404


@pytest.mark.parametrize("model", ["coder/alpha", "alpha"])
def test_a_lora_adapter_as_model_runs_in_its_group_with_that_adapter(openai, connection, server, model):
    add_reader(connection, reader_id="coder-1", consumer_group="coder", loras=LoraStatus(available=["alpha"]))
    worker = FakeWorker(server, consumer_group="coder")
    worker.serve(hello)
    response = openai.post("/v1/chat/completions", json=chat(model=model))
    worker.join()
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["model"] == model
    job = worker.jobs[0]
    assert (job.request.consumer_group, job.request.lora_id) == ("coder", "alpha")


def test_an_adapter_several_groups_serve_must_be_named_with_its_group(openai, connection):
    loras = LoraStatus(available=["alpha"])
    add_reader(connection, reader_id="a-1", consumer_group="a", loras=loras)
    add_reader(connection, reader_id="b-1", consumer_group="b", loras=loras)
    response = openai.post("/v1/chat/completions", json=chat(model="alpha"))
    assert response.status_code == 400
    assert "a/alpha" in response.get_json()["error"]["message"]


def test_an_unknown_adapter_of_a_known_group_is_model_not_found(openai):
    response = openai.post("/v1/completions", json={"model": "primary/gamma", "prompt": "x"})
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "model_not_found"
