"""How the API asks `mmserve serve` to start or stop local worker processes
(Takeoff's POST /reader and DELETE /reader/{id}), over shared.rpc."""

from __future__ import annotations

from typing import Any, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared import defaults, keys, rpc
from shared.settings import DEVICES, DTYPES, WorkerSettings, declared

_WORKER_SETTINGS = {one.attribute: one for one in declared(WorkerSettings)}


def _worker_setting(attribute: str, *, own_default: bool = False, **constraints: Any) -> Any:
    """A ReaderSpec field mirroring a worker setting: its range and help. Unset, it is what `serve` was
    started with, or with `own_default` the setting's declared default."""
    one = _WORKER_SETTINGS[attribute]
    if one.minimum is not None:
        constraints["gt" if one.above_minimum else "ge"] = one.minimum
    if one.maximum is not None:
        constraints["le"] = one.maximum
    if own_default:
        return Field(one.default, description=f"As {one.flag}. {one.help}", **constraints)
    unset = "unset = what `serve` was started with"
    return Field(None, description=f"As {one.flag}; {unset}. {one.help}", **constraints)


class ReaderSpec(BaseModel):
    """Body of POST /reader: the worker to start (Takeoff's reader config, the keys mmserve honours)."""

    model_config = ConfigDict(extra="forbid")

    model_name: str | None = Field(None, description="HF model id or path; unset = the model `serve` runs.")
    consumer_group: str = _worker_setting(
        "consumer_group", own_default=True, pattern=defaults.CONSUMER_GROUP_PATTERN
    )
    max_batch_size: int | None = _worker_setting("max_batch_size")
    batch_duration_millis: int | None = _worker_setting("batch_duration_millis")
    device: Literal[DEVICES] | None = _worker_setting("device")
    dtype: Literal[DTYPES] | None = _worker_setting("dtype")
    threads: int | None = _worker_setting("threads")


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
    return keys.supervisor_inbox(supervisor_id)


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
