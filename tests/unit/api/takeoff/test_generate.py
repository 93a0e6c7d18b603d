"""/generate and /generate_stream end to end over fake Redis: a fake worker takes
the RQ job and publishes events; the API relays them as JSON or SSE."""

import json

import pytest
from werkzeug.test import EnvironBuilder

from api.state import state_of
from shared import defaults, events, keys
from shared.payload import JOB_FUNCTION
from tests.support.api_fakes import INFERENCE_URL, add_reader, done, token, wait_for
from tests.unit.api.conftest import client_on


@pytest.fixture(autouse=True)
def _reader(connection):
    add_reader(connection)


def hello_world(job):
    """One row: a duplicate seq (as after a re-run) and a token holding a newline."""
    yield token(0, 0, "Hel")
    yield token(0, 1, "lo\n")
    yield token(0, 1, "lo\n")
    yield token(0, 0, "Hel")
    yield token(0, 2, " world")
    yield done(0, 3, "eos")


def two_rows(job):
    """Rows interleaved, an empty token, and a repeated row after it finished."""
    yield token(1, 0, "B1")
    yield token(0, 0, "A1")
    yield token(0, 1, "")
    yield token(1, 1, "B2")
    yield done(1, 2)
    yield token(1, 0, "B1")
    yield token(0, 2, "A2")
    yield done(0, 3)


def test_generate_answers_the_text(client, worker):
    worker.serve(hello_world)
    response = client.post("/generate", json={"text": "Say hello", "max_new_tokens": 5})
    assert response.status_code == 200
    assert response.get_json() == {"text": "Hello\n world"}
    worker.join()


def test_the_job_is_one_json_rq_job_holding_the_generation_job(client, worker):
    worker.serve(hello_world)
    response = client.post("/generate", json={"text": "Say hello", "max_new_tokens": 5})
    assert response.status_code == 200
    worker.join()
    job, rq_job = worker.jobs[0], worker.rq_jobs[0]
    assert job.request.text == "Say hello"
    assert job.request.max_new_tokens == 5
    assert 0 <= job.seed <= defaults.MAX_SEED
    assert job.enqueued_at > 0
    assert rq_job.func_name == JOB_FUNCTION
    assert rq_job.origin == keys.queue_name("primary")
    assert rq_job.ttl == defaults.JOB_TTL_SECONDS
    assert rq_job.result_ttl == defaults.JOB_RESULT_TTL_SECONDS
    assert rq_job.failure_ttl == defaults.JOB_FAILURE_TTL_SECONDS
    assert rq_job.timeout == defaults.JOB_TIMEOUT_SECONDS
    assert rq_job.retries_left == defaults.JOB_MAX_ATTEMPTS - 1  # re-run if its worker dies


def test_a_given_seed_is_kept_and_a_missing_one_is_drawn(client, worker):
    worker.serve(lambda job: [done(0, 0)])
    worker.serve(lambda job: [done(0, 0)])
    client.post("/generate", json={"text": "a", "seed": 1234})
    client.post("/generate", json={"text": "a"})
    worker.join()
    seeds = sorted(job.seed for job in worker.jobs)
    assert 1234 in seeds
    assert len(set(seeds)) == 2


def test_generate_with_a_list_answers_a_list_in_row_order(client, worker):
    worker.serve(two_rows)
    response = client.post("/generate", json={"text": ["a", "b"]})
    assert response.get_json() == {"text": ["A1A2", "B1B2"]}
    worker.join()


def test_a_one_element_list_stays_a_list(client, worker):
    worker.serve(lambda job: [token(0, 0, "x"), done(0, 1)])
    assert client.post("/generate", json={"text": ["a"]}).get_json() == {"text": ["x"]}
    worker.join()


def test_generate_metadata_for_a_str_prompt(client, worker):
    worker.serve(hello_world)
    body = client.post("/generate", json={"text": "a", "return_metadata": True}).get_json()
    worker.join()
    assert body["text"] == "Hello\n world"
    metadata = body["metadata"]
    assert metadata["prompt_tokens"] == 7
    assert metadata["completion_tokens"] == 3
    assert metadata["finish_reason"] == "eos"
    assert 0 <= metadata["queue_time_ms"] <= metadata["time_to_first_token_ms"] <= metadata["total_time_ms"]


def test_generate_metadata_for_a_list_is_a_list(client, worker):
    worker.serve(two_rows)
    body = client.post("/generate", json={"text": ["a", "b"], "return_metadata": True}).get_json()
    worker.join()
    assert [row["completion_tokens"] for row in body["metadata"]] == [3, 2]
    assert [row["finish_reason"] for row in body["metadata"]] == ["length", "length"]


def test_a_worker_error_answers_its_status_and_body(client, worker, connection):
    def failing(job):
        yield token(0, 0, "partial")
        yield events.ErrorEvent(error="the model ran out of memory", error_type="worker_error", status=507)

    worker.serve(failing)
    response = client.post("/generate", json={"text": "a"})
    worker.join()
    assert response.status_code == 507
    assert response.get_json() == {"error": "the model ran out of memory", "error_type": "worker_error"}
    assert connection.get(keys.cancel_key(worker.jobs[0].request_id)) is None


def test_no_first_event_in_time_is_504_and_withdraws_the_job(make_app, connection):
    client = client_on(make_app(first_event_timeout_seconds=0.1), INFERENCE_URL)
    response = client.post("/generate", json={"text": "a"})
    assert response.status_code == 504
    assert response.get_json()["error_type"] == "timeout"
    assert_withdrawn(connection)


def assert_withdrawn(connection) -> None:
    """The request's job left its queue and its cancel key is set."""
    (job_key,) = connection.keys("rq:job:*")
    request_id = job_key.decode().removeprefix("rq:job:")
    assert connection.lrange(f"rq:queue:{keys.queue_name('primary')}", 0, -1) == []
    assert connection.get(keys.cancel_key(request_id)) == b"1"


def test_silence_after_the_first_event_is_504(make_app, worker):
    client = client_on(make_app(next_event_timeout_seconds=0.1), INFERENCE_URL)
    worker.serve(lambda job: [token(0, 0, "a"), 0.3, done(0, 1)])
    response = client.post("/generate", json={"text": "a"})
    assert response.status_code == 504
    assert "sent nothing" in response.get_json()["error"]
    worker.join()


def test_stream_of_a_str_prompt_is_exact_sse(client, worker, app):
    worker.serve(hello_world)
    response = client.post("/generate_stream", json={"text": "a"})
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.get_data() == b"data: Hel\n\ndata: lo\ndata: \n\ndata:  world\n\n"
    worker.join()
    assert state_of(app).hub.open_subscriptions == 0


def test_stream_of_a_list_tags_tokens_with_batch_id(client, worker):
    worker.serve(two_rows)
    response = client.post("/generate_stream", json={"text": ["a", "b"]})
    assert response.get_data(as_text=True) == (
        'data: {"text": "B1", "batch_id": 1}\n\n'
        'data: {"text": "A1", "batch_id": 0}\n\n'
        'data: {"text": "B2", "batch_id": 1}\n\n'
        'data: {"text": "A2", "batch_id": 0}\n\n'
    )
    worker.join()


def test_stream_error_after_tokens_is_an_error_event(client, worker):
    def failing(job):
        yield token(0, 0, "a")
        yield events.ErrorEvent(error="worker died", error_type="worker_error")

    worker.serve(failing)
    response = client.post("/generate_stream", json={"text": "a"})
    assert response.status_code == 200
    assert response.get_data(as_text=True) == (
        'data: a\n\nevent: error\ndata: {"error": "worker died", "error_type": "worker_error"}\n\n'
    )
    worker.join()


def test_stream_with_metadata_ends_with_a_metadata_event(client, worker):
    worker.serve(two_rows)
    response = client.post("/generate_stream", json={"text": ["a", "b"], "return_metadata": True})
    frames = response.get_data(as_text=True).split("\n\n")
    assert frames[-1] == ""
    assert frames[-2].startswith("event: metadata\ndata: ")
    metadata = json.loads(frames[-2].split("data: ", 1)[1])
    assert [row["completion_tokens"] for row in metadata] == [3, 2]
    worker.join()


def test_stream_keeps_alive_while_waiting(make_app, worker):
    client = client_on(make_app(keepalive_seconds=0.02), INFERENCE_URL)
    worker.serve(lambda job: [0.15, token(0, 0, "x"), done(0, 1)])
    body = client.post("/generate_stream", json={"text": "a"}).get_data(as_text=True)
    assert body.startswith(": keep-alive\n\n")
    assert body.endswith(": keep-alive\n\ndata: x\n\n")
    worker.join()


def test_stream_timeout_is_an_error_event(make_app):
    client = client_on(make_app(first_event_timeout_seconds=0.1), INFERENCE_URL)
    body = client.post("/generate_stream", json={"text": "a"}).get_data(as_text=True)
    assert body.startswith("event: error\n")
    assert '"error_type": "timeout"' in body


def test_closing_a_stream_early_cancels_the_job(client, worker, connection, app):
    seen_cancel = []

    def cancellable(job):
        yield token(0, 0, "first")
        yield lambda job: seen_cancel.append(
            wait_for(lambda: connection.exists(keys.cancel_key(job.request_id)))
        )

    worker.serve(cancellable)
    response = client.post("/generate_stream", json={"text": "a"}, buffered=False)
    chunks = iter(response.response)
    assert next(chunks) == b"data: first\n\n"
    response.close()
    worker.join()
    assert seen_cancel == [True]
    cancel_key = keys.cancel_key(worker.jobs[0].request_id)
    assert 0 < connection.ttl(cancel_key) <= defaults.CANCEL_TTL_SECONDS
    assert state_of(app).hub.open_subscriptions == 0


def test_closing_a_stream_before_reading_it_withdraws_the_job(app, connection):
    # The test client always reads a first chunk, so call the WSGI app as a
    # server would and close the body before iterating it (client gone at once).
    environ = EnvironBuilder(
        path="/generate_stream", base_url=INFERENCE_URL, method="POST", json={"text": "a"}
    )
    body = app(environ.get_environ(), lambda status, headers, exc_info=None: None)
    body.close()
    assert_withdrawn(connection)
    assert state_of(app).hub.open_subscriptions == 0


def test_a_finished_stream_does_not_cancel(client, worker, connection):
    worker.serve(hello_world)
    with client.post("/generate_stream", json={"text": "a"}) as response:
        response.get_data()
    worker.join()
    assert connection.get(keys.cancel_key(worker.jobs[0].request_id)) is None


def test_metrics_count_relayed_tokens_and_requests(client, worker, app):
    worker.serve(hello_world)
    with client.post("/generate", json={"text": "a"}) as response:
        assert response.status_code == 200
    worker.join()
    text = client.get("/metrics").get_data(as_text=True)
    assert 'mmserve_api_tokens_relayed_total{consumer_group="primary"} 3.0' in text
    assert 'mmserve_api_time_to_first_token_seconds_count{consumer_group="primary"} 1.0' in text
    assert 'mmserve_api_requests_total{method="POST",route="/generate",status="200"} 1.0' in text
    assert 'mmserve_api_request_duration_seconds_count{route="/generate"} 1.0' in text
