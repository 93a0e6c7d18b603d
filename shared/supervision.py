"""How the API asks `mmserve serve` to start or stop local worker processes
(Takeoff's POST /reader and DELETE /reader/{id}), over shared.rpc."""

from __future__ import annotations

from typing import Literal

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared import defaults, keys, rpc


class ReaderSpec(BaseModel):
    """Body of POST /reader: the worker to start (Takeoff's reader config, the keys mmserve honours)."""

    model_config = ConfigDict(extra="forbid")

    model_name: str | None = Field(None, description="HF model id or path; unset = the model `serve` runs.")
    consumer_group: str = Field(defaults.DEFAULT_CONSUMER_GROUP, pattern=defaults.CONSUMER_GROUP_PATTERN)
    max_batch_size: int | None = Field(None, ge=1)
    batch_duration_millis: int | None = Field(None, ge=0)
    device: Literal["auto", "cpu", "cuda"] | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    threads: int | None = Field(None, ge=1)


class Command(BaseModel):
    action: Literal["start", "stop"]
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
    answer = rpc.call(connection, commands_key(supervisor_id), command.model_dump(mode="json"))
    return None if answer is None else Reply.model_validate(answer)


def take_commands(connection: redis.Redis, supervisor_id: str) -> list[tuple[rpc.Call, Command]]:
    """Commands waiting for the supervisor (non-blocking); malformed ones are dropped."""
    commands = []
    for call in rpc.take(connection, commands_key(supervisor_id)):
        try:
            commands.append((call, Command.model_validate(call.body)))
        except ValidationError:
            continue
    return commands


def answer(connection: redis.Redis, call: rpc.Call, reply: Reply) -> None:
    rpc.reply(connection, call, reply.model_dump(mode="json"))
