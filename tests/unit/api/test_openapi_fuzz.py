"""Every operation of the OpenAPI document (inference, management and OpenAI ports) driven by
schemathesis with a bounded number of generated requests: no 5xx but the documented 501s, every
status code documented, every JSON answer as documented (errors in their port's shape), and
schema-violating requests refused. A fake worker answers every job; the reader serves images."""

from __future__ import annotations

import threading
import time

import fakeredis
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from rq.job import Job
from rq.serializers import JSONSerializer
from schemathesis.checks import not_a_server_error, positive_data_acceptance

from api.app import create_app
from api.openapi import build_openapi
from shared import events, keys
from shared.payload import GenerationJob
from shared.settings import ApiSettings
from tests.support.api_fakes import INFERENCE_URL, MANAGEMENT_URL, add_reader, done, token, wait_for

OPENAI_URL = "http://localhost:3003"
EXAMPLES = 40  # generated requests per operation
SETTINGS = ApiSettings(
    redis_url="redis://unused", first_event_timeout_seconds=5, next_event_timeout_seconds=5
)

_server = fakeredis.FakeServer()
_connection = fakeredis.FakeRedis(server=_server)
schema = schemathesis.openapi.from_dict(build_openapi(SETTINGS))
schema.app = create_app(SETTINGS, connection=_connection)  # requests go to the app in-process


def answer_every_job(server: fakeredis.FakeServer, stop: threading.Event) -> None:
    """A worker that keeps its reader registered (a vision model) and answers each job of the
    primary group with one token and a done event per row."""
    connection = fakeredis.FakeRedis(server=server)
    queue = f"rq:queue:{keys.queue_name('primary')}"
    registered = 0.0
    while not stop.is_set():
        if time.monotonic() - registered > 2:
            add_reader(connection, model_type="VISION")
            registered = time.monotonic()
        popped = connection.blpop([queue], timeout=0.2)
        if popped is None or not connection.exists(f"rq:job:{popped[1].decode()}"):
            continue
        rq_job = Job.fetch(popped[1].decode(), connection=connection, serializer=JSONSerializer)
        job = GenerationJob.model_validate(rq_job.kwargs["job"])
        channel = keys.events_channel(job.request_id)
        for row in range(len(job.request.texts)):
            connection.publish(channel, events.encode(token(row, 0, "ok")))
            connection.publish(channel, events.encode(done(row, 1)))


@pytest.fixture(scope="module", autouse=True)
def fake_worker():
    stop = threading.Event()
    worker = threading.Thread(target=answer_every_job, args=(_server, stop), daemon=True)
    worker.start()
    assert wait_for(lambda: _connection.exists(keys.reader_key("reader-1")))
    yield
    stop.set()
    worker.join(2)


def base_url(path: str) -> str:
    if path.startswith("/v1"):
        return OPENAI_URL
    if path.startswith(("/reader", "/status", "/config", "/loras")):
        return MANAGEMENT_URL
    return INFERENCE_URL


def documents_501(case) -> bool:
    return "501" in case.operation.definition.raw.get("responses", {})


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_documented(case):
    # A schema-valid request may still be refused with a documented 4xx this server's settings
    # call for (image_paths without --image-dir, OpenAI parameters not supported): not a failure.
    # Nor is a documented 501 (e.g. starting workers from an API started alone).
    excluded = [positive_data_acceptance, *([not_a_server_error] if documents_501(case) else [])]
    case.call_and_validate(base_url=base_url(case.path), excluded_checks=excluded)
