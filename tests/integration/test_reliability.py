"""Nothing lost: a worker killed mid-batch, a worker asked to stop, a client
that goes away, and Redis restarting under the API and the workers."""

from __future__ import annotations

import concurrent.futures
import signal
import threading
import time

import pytest
import redis
import requests
from rq import Queue
from rq.serializers import JSONSerializer

from bench.sse import read_stream
from mmserve.redis_server import RedisServer, free_port
from shared import keys

pytestmark = pytest.mark.integration

LONG = {"max_new_tokens": 600, "min_new_tokens": 600}
PROMPTS = ["alpha beta", "gamma", "delta epsilon zeta"]


def stream_text(url: str, payload: dict, started: threading.Event | None = None) -> tuple[str, list[str]]:
    """(joined text, event kinds) of one streaming request."""
    with requests.post(url + "/generate_stream", json=payload, stream=True, timeout=120) as response:
        assert response.status_code == 200, response.text
        if started is not None:
            started.set()
        events = read_stream(response)
    return "".join(e.data for e in events if e.event == "message"), [e.event for e in events]


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def started_job_count(redis_client) -> int:
    queue = Queue(keys.queue_name("primary"), connection=redis_client, serializer=JSONSerializer)
    return len(queue.started_job_registry.get_job_ids())


def test_a_killed_worker_s_requests_are_finished_by_another_without_duplicates(
    start_api, start_worker, redis_client, smollm2_shaped_model_dir
):
    """Under the default dtype (bfloat16 here) and the bundled model's layer shapes: the
    survivor re-runs the abandoned requests in other company, and each stream still equals
    the request's answer alone, token for token (the batch-invariant mode)."""
    serve = {"model": smollm2_shaped_model_dir, "dtype": "auto"}
    doomed = start_worker(**serve)
    api = start_api()
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(stream_text, api.url, {"text": p, **LONG}) for p in PROMPTS]
        wait_until(lambda: started_job_count(redis_client) == len(PROMPTS), 30, "the batch to start")
        doomed.process.send_signal(signal.SIGKILL)
        doomed.process.wait()
        start_worker(**serve)  # the survivor; RQ's sweep hands it the abandoned jobs
        streamed = [future.result(timeout=120)[0] for future in futures]
    alone = [stream_text(api.url, {"text": p, **LONG})[0] for p in PROMPTS]  # one at a time
    # The re-run repeats the killed run's tokens, and the relay shows each token once.
    assert streamed == alone


def test_sigterm_lets_the_running_batch_finish(start_api, start_worker, redis_client):
    worker = start_worker()
    api = start_api()
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(stream_text, api.url, {"text": p, **LONG}) for p in PROMPTS]
        wait_until(lambda: started_job_count(redis_client) == len(PROMPTS), 30, "the batch to start")
        worker.process.send_signal(signal.SIGTERM)
        results = [future.result(timeout=120) for future in futures]
    assert worker.process.wait(30) == 0
    assert all("error" not in kinds for _, kinds in results)
    assert all(len(text) > 0 for text, _ in results)
    assert "running a batch of 3 request(s)" in worker.log()


def test_a_client_that_disconnects_is_dropped_from_the_batch(start_api, start_worker, redis_client):
    worker = start_worker()
    api = start_api()
    stays = concurrent.futures.ThreadPoolExecutor(1).submit(
        stream_text, api.url, {"text": "stay", "max_new_tokens": 400, "min_new_tokens": 400}
    )
    seen = 0
    with requests.post(
        api.url + "/generate_stream",
        json={"text": "leave", "max_new_tokens": 1000, "min_new_tokens": 1000},
        stream=True,
        timeout=60,
    ) as response:
        for _ in response.iter_content(chunk_size=None):
            seen += 1
            if seen >= 5:
                break
    wait_until(lambda: "cancelling 1 row(s)" in worker.log(), 30, "the worker to drop the row")
    text, kinds = stays.result(timeout=60)
    assert "error" not in kinds and text
    queue = Queue(keys.queue_name("primary"), connection=redis_client, serializer=JSONSerializer)
    wait_until(lambda: len(queue.finished_job_registry.get_job_ids()) == 2, 30, "both jobs to finish in RQ")
    results = [queue.fetch_job(job_id).return_value() for job_id in queue.finished_job_registry.get_job_ids()]
    (cancelled,) = [r for r in results if r["finish_reason"] == ["cancelled"]]
    # The worker stops within a few decode steps of the disconnect (measured: ~3 tokens).
    generated_after_disconnect = cancelled["usage"][0]["completion_tokens"] - seen
    assert generated_after_disconnect <= 50


def test_api_and_workers_recover_when_redis_restarts(start_api, start_worker):
    port = free_port()
    server = RedisServer(port=port).start()
    try:
        start_worker(redis_url=server.url)
        api = start_api(redis_url=server.url)
        payload = {"text": "hello", "max_new_tokens": 5}
        before = requests.post(api.url + "/generate", json=payload, timeout=30)
        assert before.status_code == 200
        server.stop()
        started = time.monotonic()
        down = requests.post(api.url + "/generate", json=payload, timeout=30)
        assert down.status_code == 503 and time.monotonic() - started < 3
        ready = requests.get(api.url + "/readyz", timeout=5)
        assert ready.status_code == 503 and "redis" in ready.text.lower()
        server = RedisServer(port=port).start()

        def answers() -> bool:
            try:
                return requests.post(api.url + "/generate", json=payload, timeout=30).status_code == 200
            except requests.RequestException:
                return False

        wait_until(answers, 60, "the system to recover after Redis came back")
        assert requests.post(api.url + "/generate", json=payload, timeout=30).json() == before.json()
        assert redis.Redis.from_url(server.url).ping()
    finally:
        server.stop()


def test_api_sigterm_lets_open_streams_finish(start_api, start_worker):
    start_worker()
    api = start_api()
    started = threading.Event()
    stream = concurrent.futures.ThreadPoolExecutor(1).submit(
        stream_text, api.url, {"text": "keep going", "max_new_tokens": 1000, "min_new_tokens": 1000}, started
    )
    started.wait(30)
    api.process.process.send_signal(signal.SIGTERM)
    assert not stream.done(), "the stream ended before the API was asked to stop"
    text, kinds = stream.result(timeout=60)
    assert "error" not in kinds and len(text) > 1000
    assert api.process.process.wait(40) == 0


def test_a_redis_url_with_a_password_works(start_api, start_worker):
    server = RedisServer(password="s3cret-pass").start()
    try:
        assert ":s3cret-pass@" in server.url
        start_worker(redis_url=server.url)
        api = start_api(redis_url=server.url)
        response = requests.post(
            api.url + "/generate", json={"text": "hello", "max_new_tokens": 3}, timeout=30
        )
        assert response.status_code == 200
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).ping()
    finally:
        server.stop()


def test_with_scale_from_zero_a_request_waits_for_the_next_worker(start_api, start_worker, redis_client):
    """What an autoscaler at zero workers sees: the last worker stops (SIGTERM, as Kubernetes
    sends), a request arrives and is queued, a new worker starts and answers it."""
    first = start_worker()
    api = start_api("--scale-from-zero", "on")
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(30) == 0
    wait_until(
        lambda: requests.get(api.url + "/readyz").json()["ready_readers"] == {"primary": 0}, 30, "no worker"
    )
    assert requests.get(api.url + "/readyz").status_code == 200  # only Redis is needed
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(stream_text, api.url, {"text": "wake up", "max_new_tokens": 8})
        queue = Queue(keys.queue_name("primary"), connection=redis_client, serializer=JSONSerializer)
        wait_until(lambda: queue.count == 1, 30, "the request to be queued")  # what KEDA counts
        start_worker()
        text, kinds = waiting.result(timeout=120)
    assert text and "error" not in kinds
