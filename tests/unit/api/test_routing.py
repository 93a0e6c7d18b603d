"""Routing by prefix: requests that start alike wait for the same reader, unless it is
busy or alone; the choice moves little when readers come and go (api.routing)."""

from __future__ import annotations

import fakeredis
import pytest

from api.routing import affinity_key, preferred_reader, routed_queue
from shared import jobs
from shared.payload import ChatMessage, GenerateRequest, GenerationJob
from shared.registry import ReaderInfo


def job(text="hello", messages=None, image_ids=(), lora_id=None, request_id="r1") -> GenerationJob:
    return GenerationJob(
        request_id=request_id,
        request=GenerateRequest(text=text, lora_id=lora_id),
        seed=1,
        enqueued_at=0.0,
        messages=messages,
        image_ids=list(image_ids),
    )


def reader(reader_id: str, **fields) -> ReaderInfo:
    values = {"ready": True, "prefix_cache_bytes": 2**30, "max_batch_size": 2, **fields}
    return ReaderInfo(reader_id=reader_id, consumer_group="primary", model_name="m", pids=[1], **values)


def conversation(first_question: str, turns: int) -> list[ChatMessage]:
    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content=first_question),
    ]
    for turn in range(turns):
        messages.append(ChatMessage(role="assistant", content=f"answer {turn}"))
        messages.append(ChatMessage(role="user", content=f"question {turn}"))
    return messages


def test_every_turn_of_a_conversation_has_one_key_and_other_conversations_others():
    keys = {affinity_key(job(messages=conversation("What is Redis?", turns))) for turns in range(4)}
    assert len(keys) == 1
    assert affinity_key(job(messages=conversation("What is RQ?", 0))) not in keys


def test_images_text_and_adapters_make_the_key():
    image = "a" * 64
    assert affinity_key(job(text="q1", image_ids=[image])) == affinity_key(job(text="q2", image_ids=[image]))
    long = "x" * 5000
    assert affinity_key(job(text=long + "a")) == affinity_key(job(text=[long + "b", "c"]))
    assert affinity_key(job(text="a")) != affinity_key(job(text="b"))
    assert affinity_key(job(lora_id="alpha")) != affinity_key(job())


def test_readers_leaving_move_only_their_own_keys():
    readers = [reader(f"w{n}") for n in range(4)]
    keys = [f"conversation {n}".encode() for n in range(200)]
    before = {key: preferred_reader(key, readers).reader_id for key in keys}
    after = {key: preferred_reader(key, readers[:3]).reader_id for key in keys}
    moved = [key for key in keys if before[key] != after[key]]
    assert moved and all(before[key] == "w3" for key in moved)
    assert len(set(before.values())) == 4  # spread over every reader


@pytest.fixture
def connection():
    return fakeredis.FakeRedis()


def test_a_request_waits_on_its_preferred_readers_queue(connection):
    readers = [reader("w1"), reader("w2")]
    request = job(text="same prefix")
    queue = routed_queue(connection, request, readers)
    expected = preferred_reader(affinity_key(request), readers)
    assert queue is not None and queue.name.endswith(expected.reader_id)


def test_the_groups_queue_when_routing_cannot_help_or_the_reader_is_busy(connection):
    request = job(text="same prefix")
    assert routed_queue(connection, request, [reader("w1")]) is None  # alone
    assert routed_queue(connection, request, [reader("w1"), reader("w2", ready=False)]) is None
    assert routed_queue(connection, request, [reader("w1"), reader("w2", prefix_cache_bytes=0)]) is None
    readers = [reader("w1"), reader("w2")]
    queue = routed_queue(connection, request, readers)
    group = jobs.queue_for(connection, "primary")
    for n in range(2):  # a batch's worth (max_batch_size 2) waits there already
        jobs.enqueue(group, job(request_id=f"waiting-{n}"), queue)
    assert routed_queue(connection, request, readers) is None
