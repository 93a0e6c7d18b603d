"""Which queue a request waits on: its group's, or the queue of the one reader of the
group most likely to hold its prompt's prefix in its prefix cache (shared.jobs).

Requests that start alike are sent to the same reader by rendezvous hashing of an
affinity key over the group's ready readers with a prefix cache: an OpenAI chat's
system messages and first user message (every turn of a conversation starts with
them), the images asked about, or else the first characters of the prompt, with the
LoRA adapter. Readers joining or leaving move only their share of the keys.

Easy to get wrong: routing must never make a request wait for one reader. A request
goes to the group's queue, which every reader takes from, when the chosen reader
already has a batch's worth of routed jobs waiting; a reader that dies leaves its
queue to the live ones, which move it back to the group's queue."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import redis
import rq

from shared import defaults, jobs
from shared.payload import ChatMessage, GenerationJob
from shared.registry import ReaderInfo


def affinity_key(job: GenerationJob) -> bytes:
    """What names the prefix a request's prompt starts with."""
    request = job.request
    parts = [f"lora:{request.lora_id}", "images:" + ",".join(job.image_ids)]
    if job.messages is not None:
        opening = [message.model_dump(mode="json") for message in _conversation_opening(job.messages)]
        parts.append("messages:" + json.dumps(opening, sort_keys=True))
    elif not job.image_ids:
        first = request.text if isinstance(request.text, str) else request.text[0]
        parts.append("text:" + first[: defaults.ROUTING_PREFIX_CHARS])
    return "\x1f".join(parts).encode()


def _conversation_opening(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """The messages up to and including the first user message."""
    opening = []
    for message in messages:
        opening.append(message)
        if message.role == "user":
            break
    return opening


def preferred_reader(key: bytes, readers: Sequence[ReaderInfo]) -> ReaderInfo:
    """The reader whose hash with `key` is highest (rendezvous hashing)."""
    return max(readers, key=lambda reader: hashlib.blake2b(key + reader.reader_id.encode()).digest())


def routed_queue(
    connection: redis.Redis, job: GenerationJob, readers: Sequence[ReaderInfo]
) -> rq.Queue | None:
    """The queue of the reader `job` should wait for, or None for its group's queue:
    fewer than two ready readers with a prefix cache, or the preferred one has a
    batch's worth of routed jobs waiting already."""
    caching = [reader for reader in readers if reader.ready and reader.prefix_cache_bytes > 0]
    if len(caching) < 2:
        return None
    reader = preferred_reader(affinity_key(job), caching)
    queue = jobs.reader_queue_for(connection, job.request.consumer_group, reader.reader_id)
    if queue.count >= reader.max_batch_size:
        return None
    return queue
