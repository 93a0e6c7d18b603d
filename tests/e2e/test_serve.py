"""`mmserve serve` as a user runs it: the bundled default model, over HTTP."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest
import requests

from bench.serving import ServeProcess
from bench.sse import read_stream
from tests.support.tiny_loras import build_tiny_lora
from worker.engine.models.loading import cache_dir, converted_default_model

pytestmark = pytest.mark.e2e

READY_TIMEOUT = 300.0  # first start converts the bundled GGUF (~20 s on 2 cores)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    """The --lora-dir of the served worker: empty at start (adapters are copied in by a test)."""
    return tmp_path_factory.mktemp("loras")


@pytest.fixture(scope="module")
def served(tmp_path_factory, lora_dir):
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    serve = ServeProcess("--workers", "1", "--lora-dir", str(lora_dir), log_path=log_path)
    try:
        serve.wait_ready(READY_TIMEOUT)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield serve.process, serve.url, serve.management_url, serve.log_path
    serve.kill()


def test_chat_template_question_is_answered_with_paris(served):
    _, url, _, _ = served
    response = requests.post(
        url + "/generate",
        json={"text": "What is the capital of France?", "use_chat_template": True, "max_new_tokens": 30},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert "Paris" in response.json()["text"]


def test_stream_and_batch_work_with_the_default_model(served):
    _, url, _, _ = served
    payload = {
        "text": ["What is the capital of France?", "Name a colour."],
        "use_chat_template": True,
        "max_new_tokens": 20,
    }
    with requests.post(url + "/generate_stream", json=payload, stream=True, timeout=120) as response:
        events = read_stream(response)
    texts = ["", ""]
    for event in events:
        texts[event.json()["batch_id"]] += event.json()["text"]
    assert "Paris" in texts[0]
    assert texts[1]


def test_workers_can_be_added_and_removed_through_the_management_port(served):
    _, url, management_url, log_path = served
    created = requests.post(management_url + "/reader", json={"consumer_group": "second"}, timeout=30)
    assert created.status_code == 201, created.text
    reader_id = created.json()["reader_id"]

    def second_group() -> list:
        return requests.get(management_url + "/reader_groups", timeout=5).json().get("second", [])

    deadline = time.monotonic() + 120
    while not any(r["reader_id"] == reader_id and r["ready"] for r in second_group()):
        assert time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.5)
    answer = requests.post(
        url + "/generate", json={"text": "Hi", "consumer_group": "second", "max_new_tokens": 3}
    )
    assert answer.status_code == 200
    assert requests.delete(management_url + f"/reader/{reader_id}", timeout=30).status_code == 200
    deadline = time.monotonic() + 60
    while second_group():
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert requests.get(url + "/readyz", timeout=5).status_code == 503  # group "second" has no worker now
    assert requests.post(url + "/generate", json={"text": "Hi", "max_new_tokens": 3}).status_code == 200


def test_an_adapter_copied_into_the_lora_dir_is_served_without_a_restart(served, lora_dir):
    # Runs before the Ctrl-C test, which ends the server.
    _, url, management_url, _ = served
    staging = lora_dir.parent / "staging-adapter"
    build_tiny_lora(converted_default_model(cache_dir()), staging, seed=7, lora_std=0.02)
    staging.rename(lora_dir / "pirate")

    def adapters() -> list:
        (reader,) = requests.get(management_url + "/reader_groups", timeout=5).json()["primary"]
        return reader["loras"]["available"]

    deadline = time.monotonic() + 30
    while "pirate" not in adapters():
        assert time.monotonic() < deadline, "the worker never listed the new adapter"
        time.sleep(0.5)
    payload = {"text": "What is the capital of France?", "use_chat_template": True, "max_new_tokens": 16}
    base = requests.post(url + "/generate", json=payload, timeout=120).json()["text"]
    adapted = [
        requests.post(url + "/generate", json={**payload, "lora_id": "pirate"}, timeout=120).json()["text"]
        for _ in range(2)
    ]
    assert adapted[0] == adapted[1] != base
    missing = requests.post(url + "/generate", json={**payload, "lora_id": "parrot"}, timeout=30)
    assert missing.status_code == 404 and missing.json()["error_type"] == "unknown_lora"


def test_ctrl_c_stops_every_process(served):
    process, _, management_url, log_path = served
    pids = [
        pid
        for readers in requests.get(management_url + "/reader_groups", timeout=5).json().values()
        for reader in readers
        for pid in reader["pids"]
    ]
    children = psutil.Process(process.pid).children(recursive=True)
    assert pids and children
    process.send_signal(signal.SIGINT)
    process.wait(60)
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"left behind: {alive}\n{log_path.read_text()[-3000:]}"
    assert not any(psutil.pid_exists(pid) for pid in pids)
