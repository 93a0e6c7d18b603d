"""The interface every grammar backend implements, and a row's grammar state.

A `Backend` is built once per tokenizer and compiles a regex or a JSON Schema
into a `Grammar`; a `Grammar` is shared by every row that uses it and gives
each row a `Matcher` (allowed tokens, advance, finished) wrapped in a
`GrammarState`. Backends never decide end of sequence: the state masks EOS out
of the backend's allowed tokens and the batch mask (masks.py) lets it back in
only while the grammar accepts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from worker.engine.grammar.bitmask import ids_to_bits, words_for


class ConstraintError(ValueError):
    """A constraint that cannot be enforced (bad regex or schema, a feature the
    backend does not support). The message is meant for the API's client."""

    status = 400


class BackendUnavailable(ConstraintError):
    """The backend's package is missing or cannot run on this machine."""

    status = 501


class Matcher(ABC):
    """A backend's per-row parser state."""

    @abstractmethod
    def fill(self, bits: torch.Tensor) -> None:
        """Write the allowed next tokens into `bits` ([1, W] int32, contiguous, CPU)."""

    @abstractmethod
    def consume(self, token_id: int) -> bool:
        """Advance by one token; False if the grammar rejects it."""

    @property
    @abstractmethod
    def accepting(self) -> bool:
        """Whether the text so far is a complete match."""


class Grammar(ABC):
    """A compiled constraint for one tokenizer: shared by every row that uses
    it, never mutated; `start` gives a row its own state."""

    backend: str

    def __init__(self, vocab_size: int, not_eos_bits: torch.Tensor):
        self.vocab_size = vocab_size
        self.not_eos_bits = not_eos_bits

    def start(self) -> GrammarState:
        return GrammarState(self, self._matcher())

    @abstractmethod
    def _matcher(self) -> Matcher: ...


class GrammarState:
    """One row's position in its grammar and the tokens it may pick next.

    `bits` always holds the current allowed tokens (EOS excluded), so the
    batch mask needs no backend call, and `complete` is known right after
    the token that completed the grammar."""

    def __init__(self, grammar: Grammar, matcher: Matcher):
        self.grammar = grammar
        self._matcher = matcher
        self.bits = torch.zeros((1, words_for(grammar.vocab_size)), dtype=torch.int32)
        self.accepting = False
        self.complete = False
        self._refresh()

    def advance(self, token_id: int) -> None:
        """Consume the row's newly sampled token (not EOS: the row ends there)."""
        if not self._matcher.consume(int(token_id)):
            raise RuntimeError(
                f"the {self.grammar.backend} grammar rejected token {token_id}, which its own mask allowed"
            )
        self._refresh()

    def _refresh(self) -> None:
        self.bits.zero_()
        self._matcher.fill(self.bits)
        self.bits &= self.grammar.not_eos_bits
        self.accepting = self._matcher.accepting
        # Nothing but EOS left: the grammar is complete. (A dead end that does
        # not accept cannot happen with a backend's own mask; stop it anyway.)
        self.complete = not bool(self.bits.any())


class Backend(ABC):
    """One backend set up for one tokenizer; compiles constraints into grammars.

    JSON Schemas compile to a fixed, compact layout: no free whitespace, which
    a weak model can repeat until max_new_tokens."""

    name: str

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_token_ids: Sequence[int], vocab_size: int):
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.not_eos_bits = ~ids_to_bits(self.eos_token_ids, vocab_size)[None, :]

    @abstractmethod
    def regex(self, pattern: str) -> Grammar:
        """The grammar of `pattern`; ConstraintError if the backend cannot compile it."""

    @abstractmethod
    def json_schema(self, schema: str) -> Grammar:
        """The grammar of `schema` (JSON text); ConstraintError if the backend cannot compile it."""
