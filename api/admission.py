"""Whether a valid payload can be served now: its consumer group exists, has a
ready worker whose model can honour the request, and its queue has room.
Everything here reads Redis; a Redis that does not answer raises
redis.exceptions.ConnectionError / TimeoutError (answered 503)."""

from __future__ import annotations

import redis
import rq

from api.errors import (
    ImagesNotAccepted,
    InvalidPayload,
    NoLiveReader,
    QueueFull,
    UnknownConsumerGroup,
    UnknownLora,
)
from shared import defaults, jobs, registry
from shared.payload import GenerateRequest
from shared.settings import ApiSettings


def job_queue(connection: redis.Redis, consumer_group: str) -> rq.Queue:
    """The RQ queue feeding a consumer group, JSON-serialised (never pickle)."""
    return jobs.queue_for(connection, consumer_group)


def admit(
    connection: redis.Redis, payload: GenerateRequest, settings: ApiSettings, *, with_images: bool = False
) -> list[registry.ReaderInfo]:
    """Raise the ApiError that stops this request, or return the group's live
    readers that can serve it (those with its lora_id, when it names one).
    `with_images`: the request carries images, which only a VISION model accepts.
    With --scale-from-zero on, a group with no ready reader admits the request
    (no readers returned): the worker that starts checks what the readers would."""
    live = _ready_readers(connection, payload.consumer_group, wait=settings.scale_from_zero == "on")
    if live:
        live = _readers_able_to_serve(live, payload, with_images=with_images)
    if settings.max_queue_depth is not None:
        _check_queue_depth(connection, payload.consumer_group, settings.max_queue_depth)
    return live


def _ready_readers(connection: redis.Redis, group: str, *, wait: bool) -> list[registry.ReaderInfo]:
    """The group's live readers, when at least one has loaded its model: 404 for a
    group no worker ever served; for one with none ready, 503 (with Retry-After), or
    none when the request is to `wait` for a worker."""
    if group not in registry.known_groups(connection):
        raise UnknownConsumerGroup(f"unknown consumer_group '{group}': no worker has ever served it")
    live = registry.live_readers(connection, group)
    if wait and not any(reader.ready for reader in live):
        return []
    if not live:
        raise NoLiveReader(
            f"consumer_group '{group}' has no live worker", retry_after=defaults.RETRY_AFTER_NO_READER_SECONDS
        )
    if not any(reader.ready for reader in live):
        raise NoLiveReader(
            f"the workers of consumer_group '{group}' are still loading their model",
            retry_after=defaults.RETRY_AFTER_NO_READER_SECONDS,
        )
    return live


def _readers_able_to_serve(
    live: list[registry.ReaderInfo], payload: GenerateRequest, *, with_images: bool
) -> list[registry.ReaderInfo]:
    """The readers whose model can take this request (images, adapter, context, chat template)."""
    group = payload.consumer_group
    if with_images and not any(reader.ready and reader.model_type == "VISION" for reader in live):
        models = ", ".join(sorted({reader.model_name for reader in live}))
        raise ImagesNotAccepted(
            f"the model of consumer_group '{group}' ({models}) is text-only: it does not accept images"
        )
    if payload.lora_id is not None:
        live = [reader for reader in live if payload.lora_id in reader.loras.available]
        if not live:
            raise UnknownLora(
                f"unknown lora_id '{payload.lora_id}': no worker of consumer_group '{group}' has that "
                "adapter (GET /loras on the management port lists them)"
            )
    context_lengths = [reader.context_length for reader in live]
    if all(length is not None for length in context_lengths):
        longest = max(context_lengths)
        if payload.max_new_tokens > longest:
            raise InvalidPayload(
                f"max_new_tokens ({payload.max_new_tokens}) exceeds the context length of "
                f"consumer_group '{group}' ({longest} tokens)"
            )
    if payload.use_chat_template and not any(reader.has_chat_template for reader in live):
        raise InvalidPayload(
            f"use_chat_template is set but the model of consumer_group '{group}' has no chat template"
        )
    return live


def _check_queue_depth(connection: redis.Redis, group: str, max_queue_depth: int) -> None:
    depth = jobs.waiting(connection, group)
    if depth >= max_queue_depth:
        raise QueueFull(
            f"the queue of consumer_group '{group}' is full ({depth} waiting requests)",
            retry_after=defaults.RETRY_AFTER_QUEUE_FULL_SECONDS,
        )
