"""When a row stops, and which tokens it may not pick on its next step.

One `Stopping` per row: it counts the row's tokens, decides its finish reason
("eos" for any of the model's end-of-sequence ids, "length" at
max_new_tokens, "stop" when the engine finds the row's constraint
complete) and knows the row's bans: end-of-sequence while fewer than
min_new_tokens tokens exist, and tokens that would repeat an n-gram
(Hugging Face `no_repeat_ngram_size` semantics, over prompt + completion).
`banned_tokens` gathers every row's bans as (row, token) pairs that the
sampler applies in its vectorised pass (worker.engine.bans).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from shared.events import FinishReason
from worker.engine.bans import TokenBans
from worker.engine.rows import GenerationParams


class NGramIndex:
    """For every (n-1)-token prefix seen in a sequence, the tokens that
    followed it; grown one token at a time."""

    def __init__(self, size: int, tokens: Sequence[int] = ()):
        if size < 1:
            raise ValueError("n-gram size must be at least 1")
        self.size = size
        self._tokens: list[int] = []
        self._followers: dict[tuple[int, ...], set[int]] = {}
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        self._tokens.append(token)
        if len(self._tokens) >= self.size:
            prefix = tuple(self._tokens[len(self._tokens) - self.size : -1])
            self._followers.setdefault(prefix, set()).add(token)

    def banned(self) -> Collection[int]:
        """Tokens that would complete an n-gram already in the sequence."""
        if len(self._tokens) + 1 < self.size:
            return ()
        prefix = tuple(self._tokens[len(self._tokens) - self.size + 1 :])
        return self._followers.get(prefix, ())


class Stopping:
    """Stopping criteria and token bans of one row."""

    def __init__(self, params: GenerationParams, prompt_ids: Sequence[int], eos_token_ids: Collection[int]):
        self.max_new_tokens = params.max_new_tokens
        self.min_new_tokens = params.min_new_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.generated = 0
        self.finish_reason: FinishReason | None = None
        self._ngrams = (
            NGramIndex(params.no_repeat_ngram_size, prompt_ids) if params.no_repeat_ngram_size > 0 else None
        )

    @property
    def eos_blocked(self) -> bool:
        """End-of-sequence is banned until min_new_tokens tokens exist."""
        return self.generated < self.min_new_tokens

    def banned_ngram_tokens(self) -> Collection[int]:
        return self._ngrams.banned() if self._ngrams is not None else ()

    def update(self, token_id: int) -> FinishReason | None:
        """Count `token_id` as generated; the finish reason if the row is done."""
        if self.finish_reason is not None:
            raise RuntimeError("row already finished")
        self.generated += 1
        if self._ngrams is not None:
            self._ngrams.append(token_id)
        if token_id in self.eos_token_ids:
            self.finish_reason = "eos"
        elif self.generated >= self.max_new_tokens:
            self.finish_reason = "length"
        return self.finish_reason

    def stop(self) -> FinishReason:
        """The row's constraint is complete."""
        self.finish_reason = "stop"
        return self.finish_reason

    def closed_by_budget(self) -> FinishReason:
        """The row's constraint was completed early to fit max_new_tokens."""
        self.finish_reason = "length"
        return self.finish_reason

    def cancel(self) -> FinishReason:
        self.finish_reason = "cancelled"
        return self.finish_reason


def banned_tokens(
    stoppings: Sequence[Stopping], vocab_size: int, device: torch.device | str = "cpu"
) -> TokenBans | None:
    """Every row's bans as (row, token) pairs, or None when no row bans anything."""
    rows: list[int] = []
    tokens: list[int] = []
    for row, stopping in enumerate(stoppings):
        banned = set(stopping.banned_ngram_tokens())
        if stopping.eos_blocked:
            banned |= stopping.eos_token_ids
        rows.extend([row] * len(banned))
        tokens.extend(banned)
    return TokenBans.from_lists(rows, tokens, len(stoppings), vocab_size, device) if rows else None
