"""The event protocol between workers and the API: one JSON message per
Redis pub/sub publish, on the request's own channel (see shared.keys)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

FinishReason = Literal["eos", "length", "stop", "cancelled"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0  # prompt tokens the worker read from its prefix cache
    accepted_draft_tokens: int = 0  # completion tokens that came as drafts the model kept (speculation)


class TokenEvent(BaseModel):
    """Text produced for one row. `seq` counts a row's token events from 0, so
    a re-run after a crash can be deduplicated by the relay."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["token"] = "token"
    row: int
    seq: int
    text: str


class DoneEvent(BaseModel):
    """A row has finished; no more events for it follow. `token_events` is how many token
    events the row had (its last `seq` + 1), so a relay that may have missed some can tell."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["done"] = "done"
    row: int
    finish_reason: FinishReason
    usage: Usage
    token_events: int | None = None
    closed_early: bool = False  # the token budget narrowed a constrained answer so it finished in time


class ErrorEvent(BaseModel):
    """The request failed; no more events for any of its rows follow."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["error"] = "error"
    error: str
    error_type: str
    status: int = 500


Event = Annotated[TokenEvent | DoneEvent | ErrorEvent, Field(discriminator="type")]
_EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def encode(event: TokenEvent | DoneEvent | ErrorEvent) -> str:
    return event.model_dump_json()


def decode(message: bytes | str) -> TokenEvent | DoneEvent | ErrorEvent:
    return _EVENT_ADAPTER.validate_json(message)
