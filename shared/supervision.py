"""How the API asks `mmserve serve` to start or stop local worker processes
(Takeoff's POST /reader and DELETE /reader/{id}), over shared.rpc."""

from __future__ import annotations

from typing import Any, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared import defaults, keys, rpc
from shared.settings import DEVICES, DTYPES, LOG_LEVELS, QUANTIZATIONS, WorkerSettings, declared

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


# Takeoff reader keys that mean nothing to mmserve (its GPU engine's knobs, its own Redis per
# reader): accepted, so a Takeoff configuration runs, and named in a warning.
IGNORED_READER_KEYS = (
    "redis_host",
    "backend",
    "tensor_parallel",
    "max_sequence_length",
    "nvlink_unavailable",
    "disable_static",
    "disable_cuda_graph",
    "cuda_graph_cache_capacity",
    "disable_paged_attention",
    "page_cache_size",
)
# Takeoff's quant_type values mmserve quantizes to (--quantize)
QUANT_TYPES = tuple(kind for kind in QUANTIZATIONS if kind != "none")


class ReaderSpec(BaseModel):
    """A reader to start: the body of POST /reader and a reader of a Takeoff manifest (Takeoff's
    reader config; unknown keys are refused, those in IGNORED_READER_KEYS accepted and ignored)."""

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
    quant_type: Literal[QUANT_TYPES] | None = Field(
        None, description="As --quantize (int8 or int4); unset = what `serve` was started with."
    )
    cuda_visible_devices: str | None = Field(
        None, description="The GPUs the reader's worker sees (its CUDA_VISIBLE_DEVICES)."
    )
    access_token: str | None = Field(
        None, description="A Hugging Face token the reader's worker loads its model with (its HF_TOKEN)."
    )
    log_level: Literal[LOG_LEVELS] | None = Field(
        None, description="The reader's worker's --log-level; unset = what `serve` was started with."
    )
    redis_host: str | None = Field(None, description="Ignored: every reader uses the Redis `serve` uses.")
    backend: str | None = Field(None, description="Ignored (Takeoff's inference backend).")
    tensor_parallel: int | None = Field(None, description="Ignored: a worker runs on one device.")
    max_sequence_length: int | None = Field(
        None, description="Ignored: the model's own context length bounds prompt + answer."
    )
    nvlink_unavailable: int | None = Field(None, description="Ignored (a Takeoff GPU setting).")
    disable_static: int | None = Field(None, description="Ignored (a Takeoff GPU setting).")
    disable_cuda_graph: int | None = Field(None, description="Ignored (a Takeoff GPU setting).")
    cuda_graph_cache_capacity: int | None = Field(None, description="Ignored (a Takeoff GPU setting).")
    disable_paged_attention: int | None = Field(None, description="Ignored (a Takeoff GPU setting).")
    page_cache_size: str | int | None = Field(None, description="Ignored (a Takeoff GPU setting).")

    @field_validator("device", mode="before")
    @classmethod
    def _lower_device(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    def ignored(self) -> list[str]:
        """The keys given that mmserve ignores."""
        return [key for key in IGNORED_READER_KEYS if getattr(self, key) is not None]

    def worker_overrides(self) -> dict[str, Any]:
        """The worker settings this reader sets (None: what `serve` was started with)."""
        return {
            "model": self.model_name,
            "consumer_group": self.consumer_group,
            "max_batch_size": self.max_batch_size,
            "batch_duration_millis": self.batch_duration_millis,
            "device": self.device,
            "dtype": self.dtype,
            "threads": self.threads,
            "quantize": self.quant_type,
        }

    def environment(self) -> dict[str, str]:
        """Variables the reader's worker process gets on top of `serve`'s own."""
        variables = {"CUDA_VISIBLE_DEVICES": self.cuda_visible_devices, "HF_TOKEN": self.access_token}
        return {name: value for name, value in variables.items() if value is not None}


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
