"""Request/reply over Redis lists: the caller pushes a request onto a
service's inbox and blocks on a reply key of its own; the service pops
requests and pushes each answer to its reply key. Used by the API to ask
`mmserve serve` to start/stop workers and to ask a reader for its tokenizer.
Everything expires: a dead service leaves nothing behind."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from shared import keys

TTL_SECONDS = 60
CALL_TIMEOUT_SECONDS = 5  # below the API client's socket timeout (shared.defaults)


@dataclass(frozen=True)
class Call:
    reply_key: str
    body: dict[str, Any]


def call(connection: redis.Redis, inbox: str, body: dict[str, Any], timeout: float = CALL_TIMEOUT_SECONDS):
    """Send `body` to the service reading `inbox`; its reply, or None if none came in time."""
    reply_key = keys.rpc_reply_key(uuid.uuid4().hex)
    with connection.pipeline() as pipe:
        pipe.rpush(inbox, json.dumps({"reply_key": reply_key, "body": body}))
        pipe.expire(inbox, TTL_SECONDS)
        pipe.execute()
    answer = connection.blpop([reply_key], timeout=timeout)
    if answer is None:
        connection.delete(reply_key)
        return None
    return json.loads(answer[1])


def take(
    connection: redis.Redis, inbox: str, *, block_seconds: float | None = None, most: int = 16
) -> list[Call]:
    """Requests waiting in `inbox`: at once, or after blocking up to `block_seconds` for the first."""
    if block_seconds is not None:
        first = connection.blpop([inbox], timeout=block_seconds)
        raw = [first[1]] if first is not None else []
    else:
        raw = connection.lpop(inbox, most) or []
    calls = []
    for blob in raw:
        try:
            message = json.loads(blob)
            calls.append(Call(reply_key=str(message["reply_key"]), body=dict(message["body"])))
        except (ValueError, KeyError, TypeError):
            continue
    return calls


def reply(connection: redis.Redis, call_: Call, body: dict[str, Any]) -> None:
    with connection.pipeline() as pipe:
        pipe.rpush(call_.reply_key, json.dumps(body))
        pipe.expire(call_.reply_key, TTL_SECONDS)
        pipe.execute()
