"""The generation payload: one pydantic model validates every request, at the
API (422 on bad input) and again when a worker reads a job."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue

from shared import defaults


class NullMeansDefault(BaseModel):
    """Base of request models where `null` means "not given" for every known key
    (Takeoff and OpenAI clients send nulls); an unknown key is an error even when null."""

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {
                key: value for key, value in data.items() if value is not None or key not in cls.model_fields
            }
        return data

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        """The JSON schema says so too: every key with a default also takes null."""
        schema = handler(core_schema)
        described = handler.resolve_ref_schema(schema)
        required = set(described.get("required", ()))
        for name, prop in described.get("properties", {}).items():
            if name not in required and not _takes_null(prop):
                kept = {key: prop[key] for key in ("title", "description", "default") if key in prop}
                rest = {key: value for key, value in prop.items() if key not in kept}
                described["properties"][name] = {**kept, "anyOf": [rest, {"type": "null"}]}
        return schema


def _takes_null(schema: dict) -> bool:
    return schema.get("type") == "null" or any(_takes_null(option) for option in schema.get("anyOf", ()))


class GenerateRequest(NullMeansDefault):
    """JSON body of /generate and /generate_stream. `null` means "default" for every key."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # JSON types: no true for 1

    text: str | list[str] = Field(description="A prompt, or a list of prompts (a batch).")
    consumer_group: str = Field(
        defaults.DEFAULT_CONSUMER_GROUP,
        pattern=defaults.CONSUMER_GROUP_PATTERN,
        description="Pool of workers (one model) that serves the request.",
    )
    max_new_tokens: int = Field(defaults.DEFAULT_MAX_NEW_TOKENS, ge=1, le=defaults.MAX_NEW_TOKENS_LIMIT)
    min_new_tokens: int = Field(
        defaults.DEFAULT_MIN_NEW_TOKENS,
        ge=0,
        le=defaults.MAX_NEW_TOKENS_LIMIT,
        description="End-of-sequence is masked until this many tokens are generated.",
    )
    sampling_temperature: float = Field(
        defaults.DEFAULT_TEMPERATURE,
        ge=0.0,
        le=defaults.MAX_TEMPERATURE,
        description="Softmax temperature; 0 means greedy.",
    )
    sampling_topk: int = Field(
        defaults.DEFAULT_TOPK,
        ge=0,
        description="Sample from the k most likely tokens; 1 = greedy, 0 = no top-k cut.",
    )
    sampling_topp: float = Field(defaults.DEFAULT_TOPP, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    repetition_penalty: float = Field(
        defaults.DEFAULT_REPETITION_PENALTY, gt=0.0, le=defaults.MAX_REPETITION_PENALTY
    )
    no_repeat_ngram_size: int = Field(
        defaults.DEFAULT_NO_REPEAT_NGRAM_SIZE, ge=0, le=64, description="0 = off."
    )
    prompt_max_tokens: int | None = Field(None, ge=1, description="Keep only the last n prompt tokens.")
    use_chat_template: bool = Field(
        False, description="Wrap the prompt in the model's chat template as a user turn."
    )
    regex_string: str | None = Field(
        None,
        description="The output fully matches this regex (Python re syntax; \\d, \\w and \\s are ASCII). "
        "Wins over json_schema when both are set.",
    )
    json_schema: dict[str, Any] | str | None = Field(
        None, description="The output is JSON valid against this JSON Schema (an object or a JSON string)."
    )
    constrained_decoding_backend: str | None = Field(
        None, description="Which library enforces the constraint: outlines (default), xgrammar or llguidance."
    )
    lora_id: str | None = Field(
        None,
        pattern=defaults.LORA_ID_PATTERN,
        description="Generate with this LoRA adapter of the consumer group's workers (GET /loras on the "
        "management port lists them); unset = the base model.",
    )
    image_paths: list[str] | None = Field(
        None,
        max_length=defaults.MAX_IMAGES_PER_REQUEST,
        description="Images for every prompt: files under the server's --image-dir, or http(s) URLs "
        "when the server allows remote images.",
    )
    return_metadata: bool = Field(
        False, description="Add token counts, finish reason and timings to the answer."
    )
    seed: int | None = Field(None, ge=0, le=defaults.MAX_SEED, description="Reproducible sampling.")

    @field_validator("text")
    @classmethod
    def _check_text(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("text must be a string or a non-empty list of strings")
        if len(texts) > defaults.MAX_BATCH_TEXTS:
            raise ValueError(f"at most {defaults.MAX_BATCH_TEXTS} prompts per request")
        for text in texts:
            if len(text) > defaults.MAX_TEXT_CHARS:
                raise ValueError(f"each prompt may hold at most {defaults.MAX_TEXT_CHARS} characters")
        return value

    @field_validator("json_schema")
    @classmethod
    def _parse_schema_string(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | None:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"json_schema is not valid JSON: {exc.msg}") from None
            if not isinstance(value, dict):
                raise ValueError("json_schema must be a JSON object")
        return value

    @model_validator(mode="after")
    def _check_token_bounds(self) -> GenerateRequest:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) must not exceed "
                f"max_new_tokens ({self.max_new_tokens})"
            )
        return self

    @property
    def is_batch(self) -> bool:
        return isinstance(self.text, list)

    @property
    def texts(self) -> list[str]:
        return list(self.text) if isinstance(self.text, list) else [self.text]

    @property
    def is_greedy(self) -> bool:
        return self.sampling_topk == 1 or self.sampling_temperature == 0.0


class ChatMessage(BaseModel):
    """One turn of a chat conversation as chat templates read it: `content` is
    a string, or a list of parts {"type": "text", "text": ...} / {"type": "image"}."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: str
    content: str | list[dict[str, str]]

    def as_template_input(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class GenerationJob(BaseModel):
    """What the API puts in an RQ job (JSON-serialised) and a worker reads back."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str
    request: GenerateRequest
    seed: int = Field(ge=0, le=defaults.MAX_SEED, description="Resolved seed: a re-run repeats itself.")
    enqueued_at: float
    image_ids: list[Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]] = Field(
        default_factory=list,
        description="Images every row is asked about, in order: keys of shared.keys.image_key.",
    )
    messages: list[ChatMessage] | None = Field(
        None,
        description="Set by the OpenAI chat route, never by /generate: every row's prompt is this "
        "conversation in the model's chat template (assistant turn opened) instead of its text; "
        "each {'type': 'image'} part stands for the next of image_ids.",
    )

    def template_messages(self) -> list[dict[str, Any]] | None:
        """`messages` as plain dicts, the input of apply_chat_template (None for /generate jobs)."""
        return None if self.messages is None else [message.as_template_input() for message in self.messages]


JOB_FUNCTION = "worker.jobs.generate"
"""Dotted path of the function every generation job names (RQ stores it as text)."""
