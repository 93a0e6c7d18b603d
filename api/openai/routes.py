"""The OpenAI-compatible generation routes (port 3003 by default): POST
/v1/chat/completions and POST /v1/completions, served by the same queues and
workers as /generate (the models are listed by api.openai.models).

A request becomes one /generate payload: `model` names the consumer group (or
a LoRA adapter), the `n` choices are the job's rows (row i sampled with seed + i),
a chat's messages travel in the job for the worker's chat template, and
response_format becomes json_schema. `stop` is applied by api.openai.answers on
the relayed text, not by the worker."""

from __future__ import annotations

import base64
import binascii
import time
from typing import Any

from flask import Blueprint, Response, jsonify, request
from pydantic import ValidationError

from api import images
from api.errors import ENCODERS_NOT_YET, InvalidConstraint, NotImplementedYet
from api.openai.answers import CHAT, TEXT, Choice, Run, stream_response, whole_answer
from api.openai.errors import OpenAIError
from api.openai.models import resolve_model
from api.openai.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ImagePart,
    TextPart,
    parse_request,
)
from api.openai.schemas import ChatMessage as OpenAIMessage
from api.openai.stops import StopScanner
from api.payloads import describe_validation_error, read_json_body
from api.state import app_state
from api.submission import start_generation
from shared import defaults, registry
from shared.payload import ChatMessage, GenerateRequest

blueprint = Blueprint("openai", __name__, url_prefix="/v1")


@blueprint.post("/embeddings")
def embeddings() -> Response:
    """OpenAI's embeddings route (the Takeoff client's `embed`): 501 until mmserve serves encoders."""
    raise NotImplementedYet(ENCODERS_NOT_YET)


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
    return stream_response(run) if chat.stream else jsonify(whole_answer(run))


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
    return stream_response(run) if completion.stream else jsonify(whole_answer(run))


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


def _start(
    openai_request: ChatCompletionRequest | CompletionRequest,
    payload: GenerateRequest,
    *,
    image_sources: list[tuple[str, str]],
    messages: list[ChatMessage] | None,
    kind: str,
) -> Run:
    """Start the generation (api.submission), answering a constraint it refuses
    as an error of the `response_format` parameter."""
    try:
        generation = start_generation(
            payload,
            image_count=len(image_sources),
            load_images=lambda: [_load_image(url, where) for url, where in image_sources],
            messages=messages,
        )
    except InvalidConstraint as exc:
        raise OpenAIError(exc.message, param="response_format", error_type=exc.error_type) from None
    stops = openai_request.stops
    prefix = "chatcmpl-" if kind == CHAT else "cmpl-"
    return Run(
        kind=kind,
        openai_request=openai_request,
        generation=generation,
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
