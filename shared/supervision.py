"""How the API asks `mmserve serve` to start or stop local worker processes
(Takeoff's POST /reader and DELETE /reader/{id}): a command list in Redis that
the supervisor polls, and a reply key per command."""

from __future__ import annotations

import json
import uuid
from typing import Literal

import redis
from pydantic import BaseModel, ConfigDict, Field

from shared import keys, limits

REPLY_TTL_SECONDS = 60
REPLY_TIMEOUT_SECONDS = 5  # below the client's socket timeout (shared.limits)


class ReaderSpec(BaseModel):
    """Body of POST /reader: the worker to start (Takeoff's reader config, the keys mmserve honours)."""

    model_config = ConfigDict(extra="forbid")

    model_name: str | None = Field(None, description="HF model id or path; unset = the model `serve` runs.")
    consumer_group: str = Field(limits.DEFAULT_CONSUMER_GROUP, pattern=limits.CONSUMER_GROUP_PATTERN)
    max_batch_size: int | None = Field(None, ge=1)
    batch_duration_millis: int | None = Field(None, ge=0)
    device: Literal["auto", "cpu", "cuda"] | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    threads: int | None = Field(None, ge=1)


class Command(BaseModel):
    action: Literal["start", "stop"]
    reply_key: str
    spec: ReaderSpec | None = None
    reader_id: str | None = None


class Reply(BaseModel):
    ok: bool
    status: int = 200
    error: str | None = None
    reader_id: str | None = None
    pid: int | None = None


def commands_key(supervisor_id: str) -> str:
    return f"{keys.PREFIX}:supervisor:{supervisor_id}:commands"


def send(connection: redis.Redis, supervisor_id: str, command: Command) -> Reply | None:
    """Hand a command to the supervisor and wait for its reply (None: no answer in time)."""
    with connection.pipeline() as pipe:
        pipe.rpush(commands_key(supervisor_id), command.model_dump_json())
        pipe.expire(commands_key(supervisor_id), REPLY_TTL_SECONDS)
        pipe.execute()
    answer = connection.blpop([command.reply_key], timeout=REPLY_TIMEOUT_SECONDS)
    return None if answer is None else Reply.model_validate_json(answer[1])


def new_reply_key() -> str:
    return f"{keys.PREFIX}:supervisor:reply:{uuid.uuid4().hex}"


def take_commands(connection: redis.Redis, supervisor_id: str, most: int = 16) -> list[Command]:
    """Commands waiting for the supervisor (non-blocking)."""
    raw = connection.lpop(commands_key(supervisor_id), most) or []
    commands = []
    for blob in raw:
        try:
            commands.append(Command.model_validate(json.loads(blob)))
        except ValueError:
            continue
    return commands


def answer(connection: redis.Redis, command: Command, reply: Reply) -> None:
    with connection.pipeline() as pipe:
        pipe.rpush(command.reply_key, reply.model_dump_json())
        pipe.expire(command.reply_key, REPLY_TTL_SECONDS)
        pipe.execute()
