"""Metrics move when requests flow."""

from __future__ import annotations

import re

import pytest

from tests.support.api_fakes import add_reader, done, token


@pytest.fixture(autouse=True)
def _reader(connection):
    add_reader(connection)


def sample(client, name: str, **labels: str) -> float:
    text = client.get("/metrics").get_data(as_text=True)
    label_text = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    pattern = (
        rf"^{re.escape(name)}{{{re.escape(label_text)}}} (\S+)$" if labels else rf"^{re.escape(name)} (\S+)$"
    )
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_errors_are_counted_by_type(client):
    before = sample(client, "mmserve_api_errors_total", error_type="validation_error")
    client.post("/generate", json={"text": "x", "bogus": 1})
    client.post("/generate", json={"text": "x", "max_new_tokens": 0})
    assert sample(client, "mmserve_api_errors_total", error_type="validation_error") == before + 2


def test_a_served_request_moves_requests_queue_time_and_tokens(client, worker):
    worker.serve(lambda job: [token(0, 0, "a"), token(0, 1, "b"), done(0, 2)])
    labels = {"consumer_group": "primary"}
    queue_before = sample(client, "mmserve_api_queue_time_seconds_count", **labels)
    tokens_before = sample(client, "mmserve_api_tokens_relayed_total", **labels)
    with client.post("/generate", json={"text": "x"}) as response:  # counted when the response closes
        assert response.status_code == 200
    worker.join()
    assert sample(client, "mmserve_api_queue_time_seconds_count", **labels) == queue_before + 1
    assert sample(client, "mmserve_api_tokens_relayed_total", **labels) == tokens_before + 2
    assert sample(client, "mmserve_api_requests_total", route="/generate", method="POST", status="200") >= 1


def test_an_error_inside_a_stream_is_counted(client, worker):
    from shared import events

    worker.serve(lambda job: [events.ErrorEvent(error="boom", error_type="generation_error", status=500)])
    with client.post("/generate_stream", json={"text": "x"}) as response:
        assert b"event: error" in response.get_data()
    worker.join()
    assert sample(client, "mmserve_api_errors_total", error_type="generation_error") == 1


def test_worker_counters_from_the_reader_registry_are_exported(client, connection):
    from shared.registry import WorkerStats

    stats = WorkerStats(
        requests_finished=5,
        requests_failed=1,
        tokens_generated=321,
        decode_steps=40,
        decode_seconds=2.5,
        rows_per_step={
            "1": 10,
            "2": 10,
            "4": 25,
            "8": 40,
            "16": 40,
            "32": 40,
            "64": 40,
            "128": 40,
            "+Inf": 40,
        },
        rows_sum=150,
    )
    add_reader(connection, reader_id="w-1", stats=stats)
    labels = {"consumer_group": "primary", "reader_id": "w-1"}
    assert sample(client, "mmserve_worker_tokens_generated_total", **labels) == 321
    assert sample(client, "mmserve_worker_requests_total", **labels, outcome="failed") == 1
    assert sample(client, "mmserve_worker_batch_rows_count", **labels) == 40
    assert sample(client, "mmserve_worker_batch_rows_bucket", **labels, le="4") == 25
    assert sample(client, "mmserve_worker_max_batch_size", **labels) == 8
