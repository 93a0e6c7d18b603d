"""Pydantic models of the API's answers (the request payload lives in
shared.payload). Routes build their bodies from them and the OpenAPI document
describes them."""

from __future__ import annotations

from pydantic import BaseModel, Field

from shared.events import FinishReason
from shared.registry import ModelType


class ErrorBody(BaseModel):
    error: str = Field(description="What went wrong, naming the offending keys or resources.")
    error_type: str = Field(description="Stable machine-readable kind, e.g. validation_error, queue_full.")


class RowMetadata(BaseModel):
    """Counts from the worker; timings measured at the API from the moment the job was enqueued."""

    prompt_tokens: int | None
    completion_tokens: int | None
    cached_prompt_tokens: int | None = Field(
        None, description="Prompt tokens the worker read from its prefix cache instead of prefilling them."
    )
    accepted_draft_tokens: int | None = Field(
        None,
        description="Completion tokens the worker drafted (from the row's own text or with its draft model) "
        "and the model kept (speculative decoding); the answer is what it would be without drafting.",
    )
    finish_reason: FinishReason | None
    closed_early: bool | None = Field(
        None,
        description="True when max_new_tokens was about to cut a regex_string or json_schema answer and "
        "the answer was completed by the shortest way the constraint allows (finish_reason is then "
        "length).",
    )
    queue_time_ms: float | None = Field(description="Enqueued until the first event from a worker.")
    time_to_first_token_ms: float | None = Field(description="Enqueued until this row's first token.")
    total_time_ms: float | None = Field(description="Enqueued until this row finished.")


class GenerateResponse(BaseModel):
    text: str | list[str] = Field(description="Shaped like the request's text: a string, or one per prompt.")
    metadata: RowMetadata | list[RowMetadata] | None = Field(
        None, description="Only with return_metadata; a list for a list of prompts."
    )


class ReaderSummary(BaseModel):
    reader_id: str
    model_name: str
    model_type: ModelType
    pids: list[int]
    ready: bool


class Readiness(BaseModel):
    ready: bool
    reasons: list[str]
    ready_readers: dict[str, int] = Field(description="Ready workers per consumer group.")


class Health(BaseModel):
    status: str
