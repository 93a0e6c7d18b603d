"""Server-Sent Events framing (https://html.spec.whatwg.org/multipage/server-sent-events.html).

An event is `field: value` lines closed by a blank line. A value may not hold a
line break, so text with line breaks becomes several `data:` lines of one
event, which a client joins back with "\\n". The SSE parser treats "\\r\\n",
"\\r" and "\\n" all as line ends, so each of them is sent as a line split and
arrives as "\\n": the only change SSE makes to streamed text."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
"""Sent with every event stream: no caching, and no buffering by a proxy such as nginx."""

KEEPALIVE = ": keep-alive\n\n"
"""A comment line: ignored by SSE clients, keeps proxies and the socket busy."""

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def event(data: str, *, name: str | None = None) -> str:
    """One event carrying `data` (possibly spread over several data: lines)."""
    head = f"event: {name}\n" if name else ""
    body = "".join(f"data: {line}\n" for line in _LINE_BREAK.split(data))
    return f"{head}{body}\n"


def json_event(value: Any, *, name: str | None = None) -> str:
    """One event whose data is `value` as JSON (always a single data: line)."""
    return event(json.dumps(value, ensure_ascii=False), name=name)


def token(text: str) -> str:
    """A token of a single-prompt stream; empty text sends nothing."""
    return event(text) if text else ""


def batch_token(text: str, row: int) -> str:
    """A token of a batch stream, tagged with its prompt's index; empty text sends nothing."""
    return json_event({"text": text, "batch_id": row}) if text else ""


def error(message: str, error_type: str) -> str:
    return json_event({"error": message, "error_type": error_type}, name="error")


class StreamBody:
    """A streamed response body that ends its request when the response ends. The
    WSGI server calls `close` then, also when the client went away mid-stream: the
    request is ended (job cancelled, images released) even if the body was never
    iterated, which a bare generator would not notice."""

    def __init__(self, events: Iterator[str], end_request: Callable[[], None]) -> None:
        self._events = events
        self._end_request = end_request

    def __iter__(self) -> Iterator[str]:
        return self._events

    def close(self) -> None:
        self._events.close()
        self._end_request()
