"""Answers the calls the API sends this reader (shared.reader_calls over shared.rpc),
from a background thread: Takeoff's tokenizer routes with the reader's own tokenizer,
and LoRA loads through the engine (which waits for the running decode step)."""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from pydantic import ValidationError
from transformers import PreTrainedTokenizerBase

from shared import reader_calls, rpc
from shared.reader_calls import ChatTemplateRequest, DetokenizeRequest, LoadLoraRequest, TokenizeRequest
from worker.engine.adapters import AdapterError
from worker.engine.engine import Engine

log = logging.getLogger(__name__)


def answer(
    tokenizer: PreTrainedTokenizerBase, tool: str, body: dict[str, Any], engine: Engine | None = None
) -> dict[str, Any]:
    """The reply body for one request: {"ok": true, "result": ...} or {"ok": false, "status", "error"}."""
    model = reader_calls.REQUESTS.get(tool)
    if model is None:
        return {"ok": False, "status": 404, "error": f"unknown tool '{tool}'"}
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        return {"ok": False, "status": 422, "error": str(exc)}
    if isinstance(request, LoadLoraRequest):
        return _load_lora(engine, request.lora_id)
    try:
        return {"ok": True, "result": _run(tokenizer, request)}
    except Exception as exc:  # a template that raises, ids out of range...
        return {"ok": False, "status": 400, "error": f"the tokenizer refused: {exc}"}


def _run(tokenizer: PreTrainedTokenizerBase, request) -> dict[str, Any]:
    if isinstance(request, TokenizeRequest):
        if request.use_chat_template and getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": request.text}], tokenize=True, return_dict=False
            )
            ids = ids["input_ids"] if isinstance(ids, dict) else ids
        else:
            ids = tokenizer(request.text, add_special_tokens=False)["input_ids"]
        ids = [int(token) for token in ids]
        return {"tokens": tokenizer.convert_ids_to_tokens(ids), "token_ids": ids, "tokens_count": len(ids)}
    if isinstance(request, DetokenizeRequest):
        ids = request.tokens
        if ids and isinstance(ids[0], str):
            ids = tokenizer.convert_tokens_to_ids(ids)
        vocab = len(tokenizer)
        if any(token is None or not 0 <= int(token) < vocab for token in ids):
            raise ValueError(f"token ids must lie in [0, {vocab})")
        return {"text": tokenizer.decode(ids, skip_special_tokens=request.skip_special_tokens)}
    assert isinstance(request, ChatTemplateRequest)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template")
    messages = [
        tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=request.add_generation_prompt
        )
        for conversation in request.conversations()
    ]
    return {"messages": messages}


def _load_lora(engine: Engine | None, lora_id: str) -> dict[str, Any]:
    if engine is None:
        return {"ok": False, "status": 404, "error": "this reader serves no LoRA adapters"}
    try:
        seconds = engine.load_adapter(lora_id)
    except AdapterError as exc:
        return {"ok": False, "status": exc.status, "error": str(exc), "error_type": exc.error_type}
    assert engine.adapters is not None  # load_adapter raised otherwise
    return {
        "ok": True,
        "result": {"lora_id": lora_id, "load_seconds": round(seconds, 4), "loaded": engine.adapters.loaded},
    }


class ReaderCallServer:
    """The thread that answers the calls in this reader's inbox until stopped."""

    def __init__(
        self,
        connection: redis.Redis,
        reader_id: str,
        tokenizer: PreTrainedTokenizerBase,
        engine: Engine | None = None,
    ):
        self._connection = connection
        self._inbox = reader_calls.inbox(reader_id)
        self._tokenizer = tokenizer
        self._engine = engine
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reader-calls", daemon=True)

    def start(self) -> ReaderCallServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=3)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for call in rpc.take(self._connection, self._inbox, block_seconds=1):
                    body = answer(
                        self._tokenizer,
                        str(call.body.get("tool")),
                        call.body.get("request") or {},
                        self._engine,
                    )
                    rpc.reply(self._connection, call, body)
            except redis.RedisError as exc:
                log.warning("reader calls: Redis unavailable (%s); retrying", exc)
                self._stop.wait(1)
