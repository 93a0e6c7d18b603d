"""The deployed shape as separate processes: one Redis, one API, workers
started independently, joining and leaving while traffic flows."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import requests
from rq import Queue
from rq.serializers import JSONSerializer

from shared import keys

pytestmark = pytest.mark.integration


def test_workers_join_and_leave_under_traffic(start_api, start_worker, redis_client):
    first = start_worker()
    api = start_api()
    statuses: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def client(index: int) -> None:
        while not stop.is_set():
            payload = {"text": f"client {index} says", "max_new_tokens": 8}
            started = time.monotonic()
            try:
                statuses.append(requests.post(api.url + "/generate", json=payload, timeout=60).status_code)
            except requests.RequestException as exc:
                failures.append(f"client {index}, after {time.monotonic() - started:.1f} s: {exc}")

    clients = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for thread in clients:
        thread.start()
    try:
        start_worker()
        start_worker()
        first.process.send_signal(signal.SIGTERM)  # leaves: finishes its batch, then exits
        assert first.process.wait(30) == 0
        time.sleep(2)
    finally:
        stop.set()
        for thread in clients:
            thread.join(60)
    assert not failures, failures
    assert statuses and set(statuses) == {200}, statuses
    queue = Queue(keys.queue_name("primary"), connection=redis_client, serializer=JSONSerializer)
    served_by = {queue.fetch_job(job_id).worker_name for job_id in queue.finished_job_registry.get_job_ids()}
    assert len(served_by) >= 2, served_by
    readers = requests.get(api.management_url + "/reader_groups", timeout=5).json()["primary"]
    assert len(readers) == 2
