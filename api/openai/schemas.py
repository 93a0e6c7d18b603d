"""The request bodies of the OpenAI-compatible routes, validated strictly.

Every parameter of OpenAI's API that this server does not implement is
refused with a 400 naming it (`extra="forbid"`, and parameters such as
`frequency_penalty` or `logprobs` accepted only at the value that means "off"),
never silently ignored. `null` means "not given" for every parameter, as in
OpenAI's API. The answers are built as plain dicts in api.openai.routes."""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from api.openai.errors import OpenAIError, UnsupportedParameter
from api.payloads import describe_validation_error
from shared import defaults
from shared.payload import NullMeansDefault

MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256

# Parameters accepted only at their "off" value: (allowed values, why anything else is refused).
OFF_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "frequency_penalty": ((0, 0.0), "frequency_penalty is not supported (only 0)"),
    "presence_penalty": ((0, 0.0), "presence_penalty is not supported (only 0)"),
    "logprobs": ((False, 0), "logprobs are not supported"),
    "top_logprobs": ((0,), "logprobs are not supported"),
    "logit_bias": (({},), "logit_bias is not supported"),
    "echo": ((False,), "echo is not supported"),
    "best_of": ((1,), "best_of is not supported (only 1)"),
    "suffix": (("",), "suffix (insertion) is not supported"),
}


class _Strict(NullMeansDefault):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageUrl(_Strict):
    url: str
    detail: Literal["auto"] = Field(
        "auto", description="Only 'auto': images are used as the model takes them."
    )


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    @model_validator(mode="after")
    def _images_from_the_user_only(self) -> ChatMessage:
        if (
            self.role != "user"
            and not isinstance(self.content, str)
            and any(isinstance(part, ImagePart) for part in self.content)
        ):
            raise ValueError(f"only user messages may hold image_url parts, not {self.role} messages")
        return self


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object ({'name': ..., 'schema': ...})")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"json_schema is only allowed with type json_schema, not {self.type}")
        return self

    def schema(self) -> dict[str, Any] | None:
        """The JSON Schema the output must follow (None: free text)."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema":
            assert self.json_schema is not None
            return self.json_schema.schema_
        return None


class _Sampling(_Strict):
    """What chat and text completions share."""

    model: str = Field(description="A consumer group (see GET /v1/models).")
    max_tokens: int | None = Field(None, ge=1, le=defaults.MAX_NEW_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    n: int = Field(1, ge=1, le=defaults.MAX_BATCH_TEXTS)
    seed: int | None = Field(None, ge=0, le=defaults.MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="An end-user id; recorded nowhere, changes nothing.")
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | int | None = None
    logit_bias: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        for stop in stops:
            if not stop or len(stop) > MAX_STOP_CHARS:
                raise ValueError(f"each stop sequence must hold 1 to {MAX_STOP_CHARS} characters")
        return value

    @model_validator(mode="after")
    def _check_stream_options(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=defaults.MAX_NEW_TOKENS_LIMIT)
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None

    @field_validator("messages")
    @classmethod
    def _check_size(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        characters = sum(
            len(message.content)
            if isinstance(message.content, str)
            else sum(len(part.text) for part in message.content if isinstance(part, TextPart))
            for message in messages
        )
        if characters > defaults.MAX_TEXT_CHARS:
            raise ValueError(f"the messages may hold at most {defaults.MAX_TEXT_CHARS} characters of text")
        return messages

    @model_validator(mode="after")
    def _one_token_limit(self) -> ChatCompletionRequest:
        if None not in (self.max_tokens, self.max_completion_tokens) and (
            self.max_tokens != self.max_completion_tokens
        ):
            raise ValueError("max_tokens and max_completion_tokens disagree: give one of them")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str]
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str | list[str]) -> str | list[str]:
        prompts = [value] if isinstance(value, str) else value
        if not prompts:
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if len(prompts) > defaults.MAX_BATCH_TEXTS:
            raise ValueError(f"at most {defaults.MAX_BATCH_TEXTS} prompts per request")
        if any(len(prompt) > defaults.MAX_TEXT_CHARS for prompt in prompts):
            raise ValueError(f"each prompt may hold at most {defaults.MAX_TEXT_CHARS} characters")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


RequestModel = TypeVar("RequestModel", bound=_Sampling)


def parse_request(model: type[RequestModel], body: Any) -> RequestModel:
    """`body` as a `model`, or the 400 naming what is wrong (unsupported parameters first)."""
    if not isinstance(body, dict):
        raise OpenAIError("the body must be a JSON object")
    unknown = [key for key in body if key not in model.model_fields]
    if unknown:
        raise UnsupportedParameter(
            f"unsupported parameter(s): {', '.join(unknown)} (this server does not implement them)",
            param=unknown[0],
        )
    for key, (allowed, why) in OFF_ONLY.items():
        value = body.get(key)
        if key in model.model_fields and value is not None and not _is_one_of(value, allowed):
            raise UnsupportedParameter(f"{why}; got {key}={value!r}", param=key)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]["loc"]
        param = ".".join(str(part) for part in first if not isinstance(part, int)) or None
        message = describe_validation_error(exc).removeprefix("invalid payload: ")
        if any(detail["type"] == "extra_forbidden" for detail in exc.errors(include_url=False)):
            raise UnsupportedParameter(f"unsupported parameter(s): {message}", param=param) from None
        raise OpenAIError(message, param=param) from None


def _is_one_of(value: Any, allowed: tuple[Any, ...]) -> bool:
    # True == 1 and False == 0 in Python: compare types too, so logprobs=True is refused.
    return any(type(value) is type(choice) and value == choice for choice in allowed) or (
        isinstance(value, float) and value == 0 and 0 in allowed
    )
