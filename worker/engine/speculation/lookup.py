"""Drafting from a row's own text (prompt lookup): when the row's last few tokens
occurred before in its prompt or its output, the tokens that followed them then
are proposed as what comes next.

`TokenLookup` keeps, for every n-gram length it searches, where each n-gram last
ended, updated as tokens arrive, so a draft costs a few dictionary reads whatever
the row's length. The longest matching n-gram wins; among its occurrences, the most
recent one (the text nearest in time is the likeliest to repeat).

Easy to get wrong: the n-gram that ends at the row's last token is always found at
that very position; the lookup must use where it ended before."""

from __future__ import annotations

from collections.abc import Iterable


class TokenLookup:
    """A row's tokens so far, indexed by their n-grams of `min_ngram`..`max_ngram` tokens."""

    def __init__(self, tokens: Iterable[int] = (), *, min_ngram: int = 1, max_ngram: int = 4) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, not {min_ngram}, {max_ngram}")
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self.tokens: list[int] = []
        self._last_end: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self._lengths()}
        self._earlier_end: dict[int, int | None] = dict.fromkeys(self._lengths())
        self.extend(tokens)

    def _lengths(self) -> range:
        return range(self.min_ngram, self.max_ngram + 1)

    def __len__(self) -> int:
        return len(self.tokens)

    def append(self, token: int) -> None:
        self.tokens.append(token)
        end = len(self.tokens) - 1
        for n in self._lengths():
            if end + 1 < n:
                self._earlier_end[n] = None
                continue
            ngram = tuple(self.tokens[end + 1 - n :])
            seen = self._last_end[n]
            self._earlier_end[n] = seen.get(ngram)
            seen[ngram] = end

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            self.append(token)

    def draft(self, count: int) -> list[int]:
        """Up to `count` tokens that followed the latest earlier occurrence of the
        longest n-gram the tokens end with ([] when none occurred before)."""
        if count < 1:
            return []
        for n in reversed(self._lengths()):
            earlier = self._earlier_end[n]
            if earlier is not None:
                return self.tokens[earlier + 1 : earlier + 1 + count]
        return []
