"""The tokens rows may not pick on a step, as (row, token) pairs.

Most bans are a few tokens per row (min_new_tokens' end-of-sequence ids,
no_repeat_ngram's completions), so the sampler sets just those scores to -inf instead
of filling a [B, V] mask. Grammars ban most of the vocabulary and stay dense masks
(worker.engine.grammar); `mask` gives the pairs' dense form where the two meet."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenBans:
    """Row `rows[i]` may not pick token `tokens[i]`, in a batch of `batch` rows
    over a vocabulary of `vocab` tokens. Each pair is distinct and in range."""

    rows: torch.Tensor  # [N] long
    tokens: torch.Tensor  # [N] long
    batch: int
    vocab: int

    @classmethod
    def from_lists(
        cls, rows: list[int], tokens: list[int], batch: int, vocab: int, device: torch.device | str = "cpu"
    ) -> TokenBans | None:
        """The bans of `zip(rows, tokens)`, out-of-vocabulary tokens dropped;
        None when none is left."""
        pairs = dict.fromkeys(zip(rows, tokens, strict=True))
        kept = [(row, token) for row, token in pairs if 0 <= token < vocab]
        if not kept:
            return None
        index = torch.tensor(kept, dtype=torch.long, device=device)
        return cls(rows=index[:, 0], tokens=index[:, 1], batch=batch, vocab=vocab)

    def mask(self) -> torch.Tensor:
        """The bans as a [batch, vocab] bool mask."""
        mask = torch.zeros((self.batch, self.vocab), dtype=torch.bool, device=self.rows.device)
        mask[self.rows, self.tokens] = True
        return mask

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        """`scores` ([batch, vocab], changed in place) with the banned tokens at
        -inf, except in rows where every token is banned: those keep their
        scores rather than sampling from nothing (possible with tiny vocabularies)."""
        rows, tokens = self.rows, self.tokens
        if len(rows) >= self.vocab:
            full = torch.bincount(rows, minlength=self.batch) >= self.vocab
            kept = ~full[rows]
            rows, tokens = rows[kept], tokens[kept]
        scores[rows, tokens] = float("-inf")
        return scores
