"""The reader registry: every worker process ("reader", in Takeoff's words)
describes itself in Redis under a key that expires unless refreshed. The API
reads it to route, to tell an unknown group (404) from a dead one (503), and to
answer the management routes."""

from __future__ import annotations

import time
from typing import Literal

import redis
from pydantic import BaseModel, Field

from shared import defaults, keys

ModelType = Literal["CAUSAL", "VISION"]


BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class DrafterStats(BaseModel):
    """What one drafter of a worker's speculative decoding has done."""

    proposed: int = Field(0, description="Tokens rows drafted.")
    accepted: int = Field(0, description="Drafted tokens the model kept.")
    checks: int = Field(0, description="Row-steps that checked drafted tokens.")


class WorkerStats(BaseModel):
    """What a worker has done since it started; carried in its registry entry so
    the API's /metrics can report every worker (see api/metrics.py)."""

    requests_finished: int = 0
    requests_failed: int = 0
    tokens_generated: int = 0
    decode_steps: int = 0
    decode_seconds: float = 0.0
    rows_per_step: dict[str, int] = Field(
        default_factory=dict,
        description="Decode steps by batch rows: cumulative counts per bucket, '+Inf' last.",
    )
    rows_sum: int = 0
    prefix_cache_hit_tokens: int = Field(0, description="Prompt tokens read from the prefix cache.")
    prefix_cache_missed_tokens: int = Field(0, description="Prompt tokens prefilled (not in the cache).")
    prefix_cache_bytes: int = Field(0, description="Bytes the prefix cache holds now.")
    prefix_cache_evicted_blocks: int = Field(0, description="Blocks dropped to make room.")
    drafters: dict[str, DrafterStats] = Field(
        default_factory=dict,
        description="Speculative decoding by drafter (ngram: prompt lookup, model: the draft model).",
    )


class LoraStatus(BaseModel):
    """The LoRA adapters a reader serves (see worker/engine/adapters.py)."""

    available: list[str] = Field(default_factory=list, description="Adapter ids a request may name.")
    loaded: list[str] = Field(default_factory=list, description="In memory now, least recently used first.")
    max_loaded: int = Field(0, description="Adapters kept in memory at once (0: the reader serves none).")


class ReaderInfo(BaseModel):
    reader_id: str
    consumer_group: str
    model_name: str
    model_type: ModelType = "CAUSAL"
    pids: list[int]
    ready: bool = False
    hostname: str = ""
    device: str = "cpu"
    dtype: str = "float32"
    quantization: str = Field("none", description="Weight quantization: none, int8 or int4 (--quantize).")
    fused_layers: int = Field(0, description="Decoder layers running fused (--fuse-layers).")
    joint_prefill: bool = Field(
        False, description="Whether newcomers are prefilled inside the running batch's decode steps."
    )
    batch_invariant: bool = Field(
        False, description="Whether a request's tokens are independent of its batch (--batch-invariant)."
    )
    batch_invariance: str = Field(
        "", description="What --batch-invariant covers for this model, or why it does not."
    )
    prefix_cache_bytes: int = Field(
        0, description="Bytes the prefix cache may hold (--prefix-cache-bytes); 0 when it is off."
    )
    prefix_cache: str = Field("", description="Whether the prefix cache is on, or why it is off.")
    prefix_cache_block_tokens: int = Field(
        defaults.PREFIX_CACHE_BLOCK_TOKENS, description="Tokens per prefix-cache block (and prefill chunk)."
    )
    speculative: str = Field(
        "off", description="Speculative decoding (--speculative): auto, ngram, or why it is off."
    )
    draft_model: str | None = Field(None, description="The draft model rows may draft with (--draft-model).")
    draft_tokens: int = Field(
        defaults.DEFAULT_DRAFT_TOKENS, description="Most tokens a row drafts per step (--draft-tokens)."
    )
    threads: int | None = None
    max_batch_size: int = defaults.DEFAULT_MAX_BATCH_SIZE
    batch_duration_millis: int = defaults.DEFAULT_BATCH_DURATION_MILLIS
    context_length: int | None = Field(None, description="Longest prompt + output the model takes.")
    has_chat_template: bool = False
    image_min_pixels: int | None = Field(
        None, description="Dynamic-resolution vision models: fewest pixels an image is scaled to."
    )
    image_max_pixels: int | None = Field(
        None, description="Dynamic-resolution vision models: most pixels an image is scaled to."
    )
    loras: LoraStatus = Field(default_factory=LoraStatus)
    stats: WorkerStats = Field(default_factory=WorkerStats)
    started_at: float = Field(default_factory=time.time)


def register(connection: redis.Redis, info: ReaderInfo) -> None:
    """Publish (or refresh) a reader's description; call every READER_HEARTBEAT_SECONDS."""
    with connection.pipeline() as pipe:
        pipe.set(keys.reader_key(info.reader_id), info.model_dump_json(), ex=defaults.READER_TTL_SECONDS)
        pipe.sadd(keys.group_readers_key(info.consumer_group), info.reader_id)
        pipe.zadd(keys.GROUPS_KEY, {info.consumer_group: time.time()})
        pipe.execute()


def deregister(connection: redis.Redis, info: ReaderInfo) -> None:
    with connection.pipeline() as pipe:
        pipe.delete(keys.reader_key(info.reader_id))
        pipe.srem(keys.group_readers_key(info.consumer_group), info.reader_id)
        pipe.execute()


def known_groups(connection: redis.Redis) -> set[str]:
    return {name.decode() for name in connection.zrange(keys.GROUPS_KEY, 0, -1)}


def groups_seen_since(connection: redis.Redis, seconds: float) -> set[str]:
    """Groups one of whose readers sent a heartbeat in the last `seconds`."""
    since = time.time() - seconds
    return {name.decode() for name in connection.zrangebyscore(keys.GROUPS_KEY, since, "+inf")}


def live_readers(connection: redis.Redis, consumer_group: str) -> list[ReaderInfo]:
    """Readers of a group whose heartbeat has not expired; prunes the dead ones."""
    group_key = keys.group_readers_key(consumer_group)
    reader_ids = sorted(member.decode() for member in connection.smembers(group_key))
    if not reader_ids:
        return []
    blobs = connection.mget([keys.reader_key(reader_id) for reader_id in reader_ids])
    dead = [reader_id for reader_id, blob in zip(reader_ids, blobs, strict=True) if blob is None]
    if dead:
        connection.srem(group_key, *dead)
    return [ReaderInfo.model_validate_json(blob) for blob in blobs if blob is not None]


def all_live_readers(connection: redis.Redis) -> dict[str, list[ReaderInfo]]:
    """Live readers by group, for every known group (a group with none maps to [])."""
    return {group: live_readers(connection, group) for group in sorted(known_groups(connection))}


def find_reader(connection: redis.Redis, reader_id: str) -> ReaderInfo | None:
    blob = connection.get(keys.reader_key(reader_id))
    return ReaderInfo.model_validate_json(blob) if blob is not None else None
