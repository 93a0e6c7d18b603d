"""Server-sent events read from a streamed `requests` response, for the benches' and the tests' clients.

Split on \\n only: a token may hold \\r, which `requests`' own iter_lines would split on."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass
class SseEvent:
    event: str
    data: str

    def json(self):
        return json.loads(self.data)


def parse_sse(lines: Iterable[str]) -> Iterator[SseEvent]:
    """Yield events per the SSE spec: `data:` lines joined by \\n, comments skipped."""
    event, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield SseEvent(event, "\n".join(data))
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value
    if data:
        yield SseEvent(event, "\n".join(data))


def iter_lines(response) -> Iterator[str]:
    """Lines of a streaming requests response, split on \n only, as they arrive.
    (requests' own iter_lines also splits on \r, \x0b, \u2028... which tokens may hold.)"""
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending = ""
    for chunk in response.iter_content(chunk_size=None):
        pending += decoder.decode(chunk)
        *lines, pending = pending.split("\n")
        yield from lines
    pending += decoder.decode(b"", final=True)
    if pending:
        yield pending


def read_stream(response) -> list[SseEvent]:
    """Read a requests streaming response to the end, splitting only on \\n
    (tokens may contain \\r, which requests.iter_lines would split on)."""
    buffer = b"".join(response.iter_content(chunk_size=None))
    text = buffer.decode("utf-8")
    return list(parse_sse(text.split("\n")))


def sse_form(text: str) -> str:
    """SSE has no way to carry a bare \r: a streamed token's \r and \r\n arrive as \n."""
    return text.replace("\r\n", "\n").replace("\r", "\n")
