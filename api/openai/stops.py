"""Stop sequences (OpenAI's `stop`), enforced by the API on the relayed text.

The engine has no stop strings, so the API watches each row's text: at the
first occurrence of any stop string the row's text is cut there (the stop
string itself is not returned, as OpenAI does), the row finishes with
finish_reason "stop", and the request is cancelled once every row is over.
A stop string may span several tokens, so the text that could still turn
into one (the longest tail that is a prefix of a stop string) is held back
until the next token decides, and released when the row ends without it."""

from __future__ import annotations

from collections.abc import Sequence


class StopScanner:
    """One row's text, cut at its first stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [stop for stop in stops if stop]
        self._longest = max((len(stop) for stop in self._stops), default=0)
        self._text = ""
        self._released = 0  # characters of _text handed out so far
        self.stopped = False
        self.tokens = 0  # token events fed until the row was over

    @property
    def text(self) -> str:
        """The text handed out so far."""
        return self._text[: self._released]

    def feed(self, piece: str) -> str:
        """Add a token's text; return what can be shown now ("" once stopped)."""
        if self.stopped:
            return ""
        self.tokens += 1
        searched_from = max(0, len(self._text) - self._longest + 1)
        self._text += piece
        cut = self._first_stop(searched_from)
        if cut is not None:
            self.stopped = True
            self._text = self._text[:cut]
            return self._release(cut)
        return self._release(len(self._text) - self._held_back())

    def finish(self) -> str:
        """The row ended without a stop string: release what was held back."""
        return "" if self.stopped else self._release(len(self._text))

    def _first_stop(self, start: int) -> int | None:
        found = [index for stop in self._stops if (index := self._text.find(stop, start)) >= 0]
        return min(found, default=None)

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        for length in range(min(self._longest - 1, len(self._text)), 0, -1):
            tail = self._text[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0

    def _release(self, end: int) -> str:
        end = max(end, self._released)
        piece = self._text[self._released : end]
        self._released = end
        return piece
