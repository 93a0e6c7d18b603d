"""Bodies over the size limit, answered so that ordinary clients can read the 413.

Most HTTP clients (Python's urllib and requests, httpx, the Takeoff and OpenAI clients)
send the whole body before they read the answer. A server that answers 413 and hangs
up while body bytes are still arriving makes the kernel reset the connection, and the
client reports "connection reset" or "broken pipe" instead of the 413. `OversizeBodies`
(WSGI middleware around the Flask app) reads what is left of such a body and throws it
away, up to `discard_limit` bytes, before the answer goes out:

- a Content-Length over the limit: the body is read and dropped before the app runs,
  the app sees an empty body and `OVERSIZE_KEY` in the environ, and answers 413 in
  its port's error shape (api.app raises PayloadTooLarge for it);
- a chunked body: the app stops reading it past the limit (MAX_CONTENT_LENGTH) and
  answers 413; what is left is read and dropped after the app returns, before the
  server sends the answer.

Past `discard_limit` nothing more is read: once the answer is sent the connection's
socket is shut down (gunicorn gives it as `gunicorn.socket`; gunicorn would otherwise
read the rest of the body, however long, to keep the connection alive). Reading is in
fixed-size pieces that are dropped at once, so a discarded body costs no memory."""

from __future__ import annotations

import contextlib
import io
import socket
from collections.abc import Callable, Iterable
from typing import Any

from werkzeug.wsgi import ClosingIterator

OVERSIZE_KEY = "mmserve.oversize_body_bytes"
"""Environ key set when the request's Content-Length is over the limit: that length."""

PIECE_BYTES = 64 * 1024


def discard(stream, limit: int) -> int:
    """Read `stream` to its end or to `limit` bytes, keeping nothing; the bytes read."""
    read = 0
    while read < limit:
        piece = stream.read(min(PIECE_BYTES, limit - read))
        if not piece:
            break
        read += len(piece)
    return read


def content_length(environ: dict) -> int | None:
    try:
        return int(environ.get("CONTENT_LENGTH") or "")
    except ValueError:
        return None


class OversizeBodies:
    """WSGI middleware: see the module's docstring."""

    def __init__(self, app: Callable, limit: int, discard_limit: int):
        self.app = app
        self.limit = limit
        self.discard_limit = discard_limit

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        length = content_length(environ)
        closing = False
        if length is not None and length > self.limit:
            environ[OVERSIZE_KEY] = length
            closing = length > self.discard_limit
            if not closing:
                discard(environ["wsgi.input"], length)
            environ["wsgi.input"] = io.BytesIO()
            environ["CONTENT_LENGTH"] = "0"
        answer: dict[str, Any] = {}

        def starting(status: str, headers: list, exc_info=None):
            answer["status"] = status
            return start_response(status, headers, exc_info)

        body = self.app(environ, starting)
        if length is None and str(answer.get("status", "")).startswith("413"):
            # the rest of a chunked body; past the bound, the connection goes
            closing = discard(environ["wsgi.input"], self.discard_limit) >= self.discard_limit
        connection = environ.get("gunicorn.socket")
        if closing and connection is not None:
            return ClosingIterator(body, lambda: _shut_down(connection))
        return body


def _shut_down(connection: socket.socket) -> None:
    """Stop reading and writing on the connection (its answer has been sent)."""
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)
