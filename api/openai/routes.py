"""The OpenAI-compatible API (port 3003 by default): POST /v1/chat/completions,
POST /v1/completions, GET /v1/models and GET /v1/models/{model}, on the same
queues and workers as /generate.

A request becomes one GenerationJob:
- `model` is the consumer group, or a LoRA adapter of one ("group/lora_id",
  or the adapter's id alone when one group has it); `n` choices (times the prompts of a text
  completion) are the job's rows, row i sampled with seed + i;
- a chat's `messages` travel in the job (GenerationJob.messages) and the
  worker renders them with the model's chat template; image_url parts (data:
  URIs, or http(s) URLs with --allow-remote-images) go through api.takeoff.images like
  any other image, and each becomes an {"type": "image"} part of its message;
- response_format json_object / json_schema become the payload's json_schema
  (checked by api.takeoff.constraints, enforced by constrained decoding);
- temperature 0 or top_p 0 is greedy; otherwise sampling has no top-k cut;
- `stop` is applied here, on the relayed text (api.openai.stops).
Answers and stream chunks have OpenAI's shapes; errors too (api.openai.errors)."""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Response, g, jsonify, request
from pydantic import ValidationError

from api import sse
from api.admission import admit
from api.errors import ApiError, InvalidConstraint
from api.openai.errors import ModelNotFound, OpenAIError, openai_error_body, openai_status
from api.openai.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ImagePart,
    TextPart,
    parse_request,
)
from api.openai.schemas import ChatMessage as OpenAIMessage
from api.openai.stops import StopScanner
from api.state import app_state
from api.submission import Generation, RequestFailed, RowFinished, StillWaiting, TokenRelayed, submit
from api.takeoff import images
from api.takeoff.constraints import check_constraint
from api.takeoff.payloads import describe_validation_error, read_json_body
from shared import defaults, registry
from shared.payload import ChatMessage, GenerateRequest

log = logging.getLogger(__name__)

blueprint = Blueprint("openai", __name__, url_prefix="/v1")

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"

# The engine's finish reasons as OpenAI names them. A grammar that completes
# ("stop") and end-of-sequence ("eos") both end the answer naturally.
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


# -- models -------------------------------------------------------------------


@blueprint.get("/models")
def list_models() -> Response:
    """One entry per consumer group, and one per LoRA adapter of a group ("group/lora_id")."""
    data = []
    for group, live in registry.all_live_readers(app_state().connection).items():
        data.append(_model_entry(group, live))
        data.extend(_adapter_entry(group, lora_id, live) for lora_id in _adapters(live))
    return jsonify({"object": "list", "data": data})


@blueprint.get("/models/<path:model>")
def retrieve_model(model: str) -> Response:
    group, lora_id = resolve_model(model)
    live = registry.live_readers(app_state().connection, group)
    return jsonify(_model_entry(group, live) if lora_id is None else _adapter_entry(group, lora_id, live))


def _model_entry(group: str, live: list[registry.ReaderInfo]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": group,
        "object": "model",
        "created": int(min((reader.started_at for reader in live), default=0)),
        "owned_by": "mmserve",
    }
    if live:
        entry["root"] = live[0].model_name
        lengths = [reader.context_length for reader in live if reader.context_length is not None]
        if lengths:
            entry["max_model_len"] = max(lengths)
    return entry


def _adapter_entry(group: str, lora_id: str, live: list[registry.ReaderInfo]) -> dict[str, Any]:
    return {**_model_entry(group, live), "id": f"{group}/{lora_id}", "root": lora_id, "parent": group}


def _adapters(live: list[registry.ReaderInfo]) -> list[str]:
    return sorted({lora_id for reader in live for lora_id in reader.loras.available})


def resolve_model(model: str) -> tuple[str, str | None]:
    """The consumer group and LoRA adapter `model` names: a group ("primary"),
    one of its adapters ("primary/alpha"), or an adapter alone ("alpha") when
    exactly one group has it."""
    connection = app_state().connection
    known = registry.known_groups(connection)
    if model in known:
        return model, None
    group, slash, lora_id = model.partition("/")
    if slash and group in known:
        if lora_id in _adapters(registry.live_readers(connection, group)):
            return group, lora_id
    elif not slash:
        owners = [g for g in sorted(known) if model in _adapters(registry.live_readers(connection, g))]
        if len(owners) == 1:
            return owners[0], model
        if owners:
            raise OpenAIError(
                f"the LoRA adapter '{model}' is served by several groups ({', '.join(owners)}): "
                f"name one, e.g. '{owners[0]}/{model}'",
                param="model",
            )
    available = ", ".join(sorted(known)) or "none yet"
    raise ModelNotFound(
        f"the model '{model}' does not exist: a model here is a consumer group ({available}), "
        "or one of its LoRA adapters as group/lora_id (GET /v1/models lists them)",
        param="model",
    )


# -- generation routes ----------------------------------------------------------


@blueprint.post("/chat/completions")
def chat_completions() -> Response:
    chat = parse_request(ChatCompletionRequest, _body())
    messages, image_sources = _translate_messages(chat.messages)
    payload = _payload(
        chat,
        texts=[""] * chat.n,
        use_chat_template=True,
        default_max_tokens=defaults.OPENAI_CHAT_DEFAULT_MAX_TOKENS,
        schema=chat.response_format.schema() if chat.response_format else None,
    )
    run = _start(chat, payload, image_sources=image_sources, messages=messages, kind=CHAT)
    return _stream_response(run) if chat.stream else jsonify(_whole_answer(run))


@blueprint.post("/completions")
def completions() -> Response:
    completion = parse_request(CompletionRequest, _body())
    texts = [prompt for prompt in completion.prompts for _ in range(completion.n)]
    payload = _payload(
        completion,
        texts=texts,
        use_chat_template=False,
        default_max_tokens=defaults.OPENAI_COMPLETION_DEFAULT_MAX_TOKENS,
        schema=None,
    )
    run = _start(completion, payload, image_sources=[], messages=None, kind=TEXT)
    return _stream_response(run) if completion.stream else jsonify(_whole_answer(run))


def _body() -> Any:
    return read_json_body(request, app_state().settings.body_size_limit_bytes)


def _translate_messages(messages: list[OpenAIMessage]) -> tuple[list[ChatMessage], list[tuple[str, str]]]:
    """The conversation as chat templates take it, and the URL of each image
    (with where it was given, for error messages), in order."""
    translated: list[ChatMessage] = []
    image_sources: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        content = message.content
        if isinstance(content, str):
            translated.append(ChatMessage(role=role, content=content))
            continue
        if not any(isinstance(part, ImagePart) for part in content):
            text = "\n".join(part.text for part in content if isinstance(part, TextPart))
            translated.append(ChatMessage(role=role, content=text))
            continue
        parts: list[dict[str, str]] = []
        for part_index, part in enumerate(content):
            if isinstance(part, ImagePart):
                where = f"messages[{index}].content[{part_index}].image_url"
                image_sources.append((part.image_url.url, where))
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": part.text})
        translated.append(ChatMessage(role=role, content=parts))
    return translated, image_sources


def _payload(
    openai_request: ChatCompletionRequest | CompletionRequest,
    *,
    texts: list[str],
    use_chat_template: bool,
    default_max_tokens: int,
    schema: dict[str, Any] | None,
) -> GenerateRequest:
    """The /generate payload the request amounts to."""
    group, lora_id = resolve_model(openai_request.model)
    if len(texts) > defaults.MAX_BATCH_TEXTS:
        raise OpenAIError(
            f"n times the number of prompts may be at most {defaults.MAX_BATCH_TEXTS}, got {len(texts)}",
            param="n",
        )
    max_tokens = openai_request.token_limit
    if max_tokens is None:
        max_tokens = _default_max_tokens(group, default_max_tokens)
    greedy = openai_request.temperature == 0 or openai_request.top_p == 0
    try:
        return GenerateRequest(
            text=texts,
            consumer_group=group,
            lora_id=lora_id,
            max_new_tokens=max_tokens,
            sampling_temperature=openai_request.temperature,
            sampling_topk=1 if greedy else 0,
            sampling_topp=1.0 if greedy else openai_request.top_p,
            seed=openai_request.seed,
            use_chat_template=use_chat_template,
            json_schema=schema,
        )
    except ValidationError as exc:
        raise OpenAIError(describe_validation_error(exc).removeprefix("invalid payload: ")) from None


def _default_max_tokens(group: str, default: int) -> int:
    """`default`, or half the group's context when that is less (the prompt needs room too)."""
    lengths = [
        reader.context_length
        for reader in registry.live_readers(app_state().connection, group)
        if reader.context_length is not None
    ]
    return max(1, min(default, max(lengths) // 2)) if lengths else default


CHAT = "chat"
TEXT = "text"


@dataclass
class Choice:
    """One row of the job as the client sees it: its text cut at a stop string, its end."""

    scanner: StopScanner
    pieces: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass
class Run:
    """A submitted OpenAI request."""

    kind: str
    openai_request: ChatCompletionRequest | CompletionRequest
    generation: Generation
    lease: images.ImageLease
    choices: list[Choice]
    id: str
    created: int

    def close(self) -> None:
        self.generation.close()
        self.lease.release()


def _start(
    openai_request: ChatCompletionRequest | CompletionRequest,
    payload: GenerateRequest,
    *,
    image_sources: list[tuple[str, str]],
    messages: list[ChatMessage] | None,
    kind: str,
) -> Run:
    """Check the request, store its images, queue its job."""
    state = app_state()
    settings = state.settings
    try:
        check_constraint(payload)
    except InvalidConstraint as exc:
        raise OpenAIError(exc.message, param="response_format", error_type=exc.error_type) from None
    images.check_image_count(len(image_sources))
    admit(state.connection, payload, settings, with_images=bool(image_sources))
    loaded = [_load_image(url, where) for url, where in image_sources]
    lease = images.ImageLease.take(state.connection, loaded)
    try:
        generation = submit(
            state.connection,
            state.hub,
            payload,
            settings,
            state.metrics,
            image_ids=lease.image_ids,
            messages=messages,
        )
    except BaseException:
        lease.release()
        raise
    g.job_id = generation.request_id
    stops = openai_request.stops
    prefix = "chatcmpl-" if kind == CHAT else "cmpl-"
    return Run(
        kind=kind,
        openai_request=openai_request,
        generation=generation,
        lease=lease,
        choices=[Choice(StopScanner(stops)) for _ in payload.texts],
        id=prefix + generation.request_id,
        created=int(time.time()),
    )


def _load_image(url: str, where: str) -> images.CanonicalImage:
    settings = app_state().settings
    if url.lower().startswith("data:"):
        data = _decode_data_uri(url, where)
    elif url.lower().startswith(("http://", "https://")):
        data = images.fetch_remote_image(url, settings, source=where)
    else:
        raise OpenAIError(
            f"{where}: an image URL must be a data: URI (or http(s) when the server allows remote images)",
            param=where,
            error_type="invalid_image",
        )
    return images.canonical_image(data, max_pixels=settings.max_image_pixels, source=where)


def _decode_data_uri(url: str, where: str) -> bytes:
    header, comma, encoded = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise OpenAIError(
            f"{where}: a data: URI must be base64 (data:image/png;base64,...)",
            param=where,
            error_type="invalid_image",
        )
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise OpenAIError(
            f"{where}: the data: URI is not valid base64", param=where, error_type="invalid_image"
        ) from None


# -- relaying -------------------------------------------------------------------


@dataclass(frozen=True)
class ChoiceText:
    index: int
    text: str


@dataclass(frozen=True)
class ChoiceFinished:
    index: int
    finish_reason: str


def _relay(
    run: Run, *, tick: float | None = None, wait_for_usage: bool = True
) -> Iterator[ChoiceText | ChoiceFinished | StillWaiting | RequestFailed]:
    """The generation's events as choices see them. A choice whose stop string
    appeared is over at once; when every choice is over the job is cancelled,
    and (`wait_for_usage`) the rows' final events are still awaited for their
    token counts."""
    generation, choices = run.generation, run.choices
    cancelled = False
    for item in generation.relay(tick=tick):
        if isinstance(item, TokenRelayed):
            choice = choices[item.row]
            if choice.finish_reason is not None:
                continue
            text = choice.scanner.feed(item.text)
            if text:
                choice.pieces.append(text)
                yield ChoiceText(item.row, text)
            if choice.scanner.stopped:
                choice.finish_reason = "stop"
                choice.completion_tokens = choice.scanner.tokens
                yield ChoiceFinished(item.row, "stop")
        elif isinstance(item, RowFinished):
            choice = choices[item.row]
            choice.prompt_tokens = item.done.usage.prompt_tokens
            if choice.finish_reason is None:
                rest = choice.scanner.finish()
                if rest:
                    choice.pieces.append(rest)
                    yield ChoiceText(item.row, rest)
                choice.finish_reason = FINISH_REASONS[item.done.finish_reason]
                choice.completion_tokens = item.done.usage.completion_tokens
                yield ChoiceFinished(item.row, choice.finish_reason)
        elif isinstance(item, RequestFailed):
            if not cancelled:
                yield item
            return
        elif not cancelled:
            yield item
        if not cancelled and not generation.finished and all(c.finish_reason for c in choices):
            if not wait_for_usage:
                return
            generation.cancel()
            cancelled = True


def _usage(run: Run) -> dict[str, int]:
    choices, n = run.choices, run.openai_request.n
    # A chat's rows share one prompt, counted once; a text completion's prompts each count once.
    by_prompt = [choices] if run.kind == CHAT else [choices[i : i + n] for i in range(0, len(choices), n)]
    prompt_tokens = sum(
        next((choice.prompt_tokens for choice in rows if choice.prompt_tokens is not None), 0)
        for rows in by_prompt
    )
    completion_tokens = sum(choice.completion_tokens or 0 for choice in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _raise_failure(failure: RequestFailed) -> None:
    raise ApiError(failure.message, status=failure.status, error_type=failure.error_type)


def _whole_answer(run: Run) -> dict[str, Any]:
    try:
        for item in _relay(run):
            if isinstance(item, RequestFailed):
                _raise_failure(item)
    finally:
        run.close()
    model = run.openai_request.model
    if run.kind == CHAT:
        choices = [
            {
                "index": index,
                "message": {"role": "assistant", "content": "".join(choice.pieces), "refusal": None},
                "logprobs": None,
                "finish_reason": choice.finish_reason,
            }
            for index, choice in enumerate(run.choices)
        ]
        kind = "chat.completion"
    else:
        choices = [
            {
                "index": index,
                "text": "".join(choice.pieces),
                "logprobs": None,
                "finish_reason": choice.finish_reason,
            }
            for index, choice in enumerate(run.choices)
        ]
        kind = "text_completion"
    return {
        "id": run.id,
        "object": kind,
        "created": run.created,
        "model": model,
        "choices": choices,
        "usage": _usage(run),
    }


def _stream_response(run: Run) -> Response:
    body = ChunkStream(run, keepalive_seconds=app_state().settings.keepalive_seconds)
    return Response(body, mimetype="text/event-stream", headers=STREAM_HEADERS)


class ChunkStream:
    """The SSE body of a streamed completion: `chat.completion.chunk` (or
    `text_completion`) events, a usage chunk with stream_options.include_usage,
    then `data: [DONE]`. An error after the stream started is one
    `data: {"error": {...}}` event (what OpenAI's clients raise), without [DONE].
    The WSGI server calls `close` when the response ends, also when the client
    went away: then the job is cancelled and its images released."""

    def __init__(self, run: Run, *, keepalive_seconds: float) -> None:
        self._run = run
        self._keepalive_seconds = keepalive_seconds
        self._chunks = self._produce()

    def __iter__(self) -> Iterator[str]:
        return self._chunks

    def close(self) -> None:
        self._chunks.close()
        self._run.close()

    def _produce(self) -> Iterator[str]:
        run = self._run
        include_usage = run.openai_request.include_usage
        chunk = self._chat_chunk if run.kind == CHAT else self._text_chunk
        try:
            if run.kind == CHAT:
                for index in range(len(run.choices)):
                    yield chunk(index, {"role": "assistant", "content": ""}, None)
            for item in _relay(run, tick=self._keepalive_seconds, wait_for_usage=include_usage):
                if isinstance(item, ChoiceText):
                    yield chunk(item.index, {"content": item.text} if run.kind == CHAT else item.text, None)
                elif isinstance(item, ChoiceFinished):
                    yield chunk(item.index, {} if run.kind == CHAT else "", item.finish_reason)
                elif isinstance(item, StillWaiting):
                    yield sse.KEEPALIVE
                elif isinstance(item, RequestFailed):
                    run.generation.count_error(item.error_type)
                    yield self._error(item.message, item.error_type, item.status)
                    return
            if include_usage:
                yield self._event(choices=[], usage=_usage(run))
            yield DONE
        except Exception:
            log.exception("request %s: stream failed", run.generation.request_id)
            yield self._error("internal server error", "internal_error", 500)
        finally:
            run.close()

    def _event(self, *, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        run = self._run
        body: dict[str, Any] = {
            "id": run.id,
            "object": "chat.completion.chunk" if run.kind == CHAT else "text_completion",
            "created": run.created,
            "model": run.openai_request.model,
            "choices": choices,
        }
        if run.openai_request.include_usage:
            body["usage"] = usage
        return sse.json_event(body)

    def _chat_chunk(self, index: int, delta: Any, finish_reason: str | None) -> str:
        return self._event(
            choices=[{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        )

    def _text_chunk(self, index: int, text: Any, finish_reason: str | None) -> str:
        return self._event(
            choices=[{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]
        )

    @staticmethod
    def _error(message: str, error_type: str, status: int) -> str:
        return sse.json_event(openai_error_body(message, error_type, openai_status(status)))
