"""Test doubles for the API tests: clients bound to one port, fake readers, and
a fake worker that takes jobs off an RQ queue and publishes scripted events."""

from __future__ import annotations

import json
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import fakeredis
from flask.testing import FlaskClient
from rq.job import Job
from rq.serializers import JSONSerializer

from shared import events, keys, reader_calls, registry, rpc
from shared.payload import JOB_FUNCTION, GenerationJob

INFERENCE_URL = "http://localhost:3000"
MANAGEMENT_URL = "http://localhost:3001"


class PortClient(FlaskClient):
    """A test client whose requests arrive on one port (werkzeug derives
    SERVER_PORT from base_url; environ_base cannot override it)."""

    base_url = INFERENCE_URL

    def open(self, *args: Any, **kwargs: Any) -> Any:
        if not args or isinstance(args[0], str):
            kwargs.setdefault("base_url", self.base_url)
        return super().open(*args, **kwargs)


def add_reader(connection: fakeredis.FakeRedis, **fields: Any) -> registry.ReaderInfo:
    info = registry.ReaderInfo(
        **{
            "reader_id": "reader-1",
            "consumer_group": "primary",
            "model_name": "tiny-test-model",
            "pids": [4242],
            "ready": True,
            "context_length": 2048,
            "has_chat_template": True,
            **fields,
        }
    )
    registry.register(connection, info)
    return info


def serve_one(connection: fakeredis.FakeRedis, reply: dict, received: list, reader_id: str = "reader-1"):
    """A thread answering the next request the API sends a reader with `reply`
    (what the request held goes into `received`)."""

    def run() -> None:
        (call,) = rpc.take(connection, reader_calls.inbox(reader_id), block_seconds=5)
        received.append(call.body)
        rpc.reply(connection, call, reply)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def token(row: int, seq: int, text: str) -> events.TokenEvent:
    return events.TokenEvent(row=row, seq=seq, text=text)


def done(row: int, completion_tokens: int, finish_reason: str = "length") -> events.DoneEvent:
    return events.DoneEvent(
        row=row,
        finish_reason=finish_reason,
        usage=events.Usage(prompt_tokens=7, completion_tokens=completion_tokens),
    )


Step = events.TokenEvent | events.DoneEvent | events.ErrorEvent | float | Callable[[GenerationJob], None]
"""An event to publish, seconds to sleep, or a callable to run (e.g. wait for something)."""


class FakeWorker:
    """Takes the next job off a group's queue as an RQ worker would, checks that
    it is a JSON-serialised GenerationJob, then plays a script of events."""

    def __init__(self, server: fakeredis.FakeServer, consumer_group: str = "primary") -> None:
        self.connection = fakeredis.FakeRedis(server=server)
        self.queue_key = f"rq:queue:{keys.queue_name(consumer_group)}"
        self.jobs: list[GenerationJob] = []
        self.rq_jobs: list[Job] = []
        self._errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []

    def serve(self, script: Callable[[GenerationJob], Iterable[Step]]) -> None:
        """Handle one job in the background with the steps `script(job)` yields."""
        thread = threading.Thread(target=self._serve_one, args=(script,), daemon=True)
        self._threads.append(thread)
        thread.start()

    def join(self, timeout: float = 10.0) -> None:
        for thread in self._threads:
            thread.join(timeout)
            assert not thread.is_alive(), "fake worker did not finish"
        if self._errors:
            raise self._errors[0]

    def _serve_one(self, script: Callable[[GenerationJob], Iterable[Step]]) -> None:
        try:
            while True:  # skip ids that name no job (queue fillers planted by a test)
                popped = self.connection.blpop([self.queue_key], timeout=10)
                assert popped is not None, "no job was enqueued"
                job_id = popped[1].decode()
                if self.connection.exists(f"rq:job:{job_id}"):
                    break
            raw = json.loads(zlib.decompress(self.connection.hget(f"rq:job:{job_id}", "data")))
            assert raw[0] == JOB_FUNCTION  # JSONSerializer: [func, instance, args, kwargs]
            rq_job = Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
            job = GenerationJob.model_validate(rq_job.kwargs["job"])
            assert job.request_id == job_id
            self.rq_jobs.append(rq_job)
            self.jobs.append(job)
            channel = keys.events_channel(job.request_id)
            for step in script(job):
                if isinstance(step, int | float):
                    time.sleep(step)
                elif callable(step):
                    step(job)
                else:
                    self.connection.publish(channel, events.encode(step))
        except BaseException as exc:
            self._errors.append(exc)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()
