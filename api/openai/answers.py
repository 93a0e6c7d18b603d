"""OpenAI's answers to a started generation: the whole JSON answer, or an SSE
stream of chunks ending in `data: [DONE]`. Each row of the job is one choice,
ended by its first stop string (api.openai.stops) or by the worker; once every
choice has ended the job is cancelled, even if the worker would go on."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from flask import Response

from api import sse
from api.errors import ApiError
from api.openai.errors import openai_error_body, openai_status
from api.openai.schemas import ChatCompletionRequest, CompletionRequest
from api.openai.stops import StopScanner
from api.state import app_state
from api.submission import Generation, RequestFailed, RowFinished, StillWaiting, TokenRelayed

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"

# The engine's finish reasons as OpenAI names them. A grammar that completes
# ("stop") and end-of-sequence ("eos") both end the answer naturally.
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}

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
    cached_tokens: int | None = None


@dataclass
class Run:
    """A submitted OpenAI request."""

    kind: str
    openai_request: ChatCompletionRequest | CompletionRequest
    generation: Generation
    choices: list[Choice]
    id: str
    created: int

    def close(self) -> None:
        self.generation.close()


@dataclass(frozen=True)
class ChoiceText:
    index: int
    text: str


@dataclass(frozen=True)
class ChoiceFinished:
    index: int
    finish_reason: str


def relay_choices(
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
            choice.cached_tokens = item.done.usage.cached_prompt_tokens
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


def _usage(run: Run) -> dict[str, Any]:
    choices, n = run.choices, run.openai_request.n
    # A chat's rows share one prompt, counted once; a text completion's prompts each count once.
    by_prompt = [choices] if run.kind == CHAT else [choices[i : i + n] for i in range(0, len(choices), n)]
    prompt_tokens = sum(
        next((choice.prompt_tokens for choice in rows if choice.prompt_tokens is not None), 0)
        for rows in by_prompt
    )
    # A prompt's cached tokens are what its first row found in the cache (its other rows
    # then find the whole prompt there).
    cached_tokens = sum(
        min((choice.cached_tokens for choice in rows if choice.cached_tokens is not None), default=0)
        for rows in by_prompt
    )
    completion_tokens = sum(choice.completion_tokens or 0 for choice in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _raise_failure(failure: RequestFailed) -> None:
    raise ApiError(failure.message, status=failure.status, error_type=failure.error_type)


def whole_answer(run: Run) -> dict[str, Any]:
    try:
        for item in relay_choices(run):
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


def stream_response(run: Run) -> Response:
    body = ChunkStream(run, keepalive_seconds=app_state().settings.keepalive_seconds)
    return Response(body, mimetype="text/event-stream", headers=sse.HEADERS)


class ChunkStream(sse.StreamBody):
    """The SSE body of a streamed completion: `chat.completion.chunk` (or
    `text_completion`) events, a usage chunk with stream_options.include_usage,
    then `data: [DONE]`. An error after the stream started is one
    `data: {"error": {...}}` event (what OpenAI's clients raise), without [DONE]."""

    def __init__(self, run: Run, *, keepalive_seconds: float) -> None:
        self._run = run
        self._keepalive_seconds = keepalive_seconds
        super().__init__(self._produce(), run.close)

    def _produce(self) -> Iterator[str]:
        run = self._run
        include_usage = run.openai_request.include_usage
        chunk = self._chat_chunk if run.kind == CHAT else self._text_chunk
        try:
            if run.kind == CHAT:
                for index in range(len(run.choices)):
                    yield chunk(index, {"role": "assistant", "content": ""}, None)
            for item in relay_choices(run, tick=self._keepalive_seconds, wait_for_usage=include_usage):
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
