"""Routing by prefix over two workers: every turn of a conversation goes to the worker
that holds it in its prefix cache; with routing off they land on either; a request
routed to a worker that dies is served by the other."""

from __future__ import annotations

import itertools
import signal

import pytest
import requests

from api.routing import affinity_key, preferred_reader
from shared import registry
from shared.payload import ChatMessage, GenerateRequest, GenerationJob

pytestmark = pytest.mark.integration

BLOCK = 16
TURNS = 5


def chat(api, messages: list[dict]) -> dict:
    body = {"model": "primary", "messages": messages, "max_tokens": 3, "temperature": 0}
    response = requests.post(api.openai_url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def conversation_reuse(api, opening: str) -> list[tuple[int, int]]:
    """Each turn's prompt tokens and those its worker read from its prefix cache."""
    messages = [{"role": "system", "content": f"You answer about {opening}, in one short sentence."}]
    counts = []
    for turn in range(TURNS):
        messages.append({"role": "user", "content": f"Tell me fact number {turn} about {opening}, please."})
        answer = chat(api, messages)
        usage = answer["usage"]
        counts.append((usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]))
        messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
    return counts


def two_workers(start_worker) -> None:
    for _ in range(2):
        start_worker("--prefix-cache-block-tokens", str(BLOCK))


def test_a_conversations_turns_find_their_prefix_on_their_worker(start_api, start_worker):
    two_workers(start_worker)
    api = start_api()
    for topic in ("rivers", "lighthouses", "bread"):
        counts = conversation_reuse(api, topic)
        for (previous, _), (_, cached) in itertools.pairwise(counts):
            assert cached >= previous // BLOCK * BLOCK, counts  # every block of the turn before


def test_a_request_routed_to_a_worker_that_died_is_served_by_another(start_api, start_worker, redis_client):
    doomed = start_worker("--prefix-cache-block-tokens", str(BLOCK), "--reader-id", "doomed")
    start_worker("--prefix-cache-block-tokens", str(BLOCK), "--reader-id", "survivor")
    api = start_api()
    readers = registry.live_readers(redis_client, "primary")
    topic = next(
        t for t in TOPICS if preferred_reader(affinity_key(job_about(t)), readers).reader_id == "doomed"
    )
    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait(timeout=10)
    # the API still sees the dead worker for a few seconds and routes the request to its queue,
    # from which the survivor moves it once the dead worker's registration has expired
    answer = chat(api, question_about(topic))
    assert answer["choices"][0]["message"]["content"]
    assert [r.reader_id for r in registry.live_readers(redis_client, "primary")] == ["survivor"]


TOPICS = ["rivers", "lighthouses", "bread", "snow", "owls", "tea", "maps", "bees", "clocks", "salt"]


def question_about(topic: str) -> list[dict]:
    return [{"role": "user", "content": f"One fact about {topic}?"}]


def job_about(topic: str) -> GenerationJob:
    """The job the API makes of `question_about(topic)`, as routing sees it."""
    messages = [ChatMessage(**message) for message in question_about(topic)]
    return GenerationJob(
        request_id="x", request=GenerateRequest(text=""), seed=0, enqueued_at=0.0, messages=messages
    )
