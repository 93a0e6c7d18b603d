"""The interface every grammar backend implements, and a row's grammar state.

A `Backend` is built once per tokenizer and compiles a regex or a JSON Schema
into a `Grammar`; a `Grammar` is shared by every row that uses it and gives
each row a `Matcher` (allowed tokens, advance, finished) wrapped in a
`GrammarState`. Backends never decide end of sequence: the state masks EOS out
of the backend's allowed tokens and the batch mask (masks.py) lets it back in
only while the grammar accepts.

A grammar that is a token automaton has a `ClosingTable` (closing.py): a row
started with a token budget then closes its answer in time, its choices
narrowed to the shortest completions once the budget comes down to them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from worker.engine.grammar.bitmask import ids_to_bits, words_for
from worker.engine.grammar.closing import ClosingTable


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

    @property
    def automaton_state(self) -> int | None:
        """The state of the grammar's token automaton, for backends that have one."""
        return None


class Grammar(ABC):
    """A compiled constraint for one tokenizer: shared by every row that uses
    it, never mutated; `start` gives a row its own state."""

    backend: str

    def __init__(self, vocab_size: int, not_eos_bits: torch.Tensor, closing: ClosingTable | None = None):
        self.vocab_size = vocab_size
        self.not_eos_bits = not_eos_bits
        self.closing = closing  # None: this backend cannot close answers within a budget

    def start(self, budget: int | None = None) -> GrammarState:
        """A row's state at the grammar's start. With a `budget` (the tokens the
        row may generate) and a closing table, the row's answer is complete
        when the budget runs out."""
        return GrammarState(self, self._matcher(), budget if self.closing is not None else None)

    def shortest_answer(self) -> int | None:
        """The fewest tokens of a complete answer; None if this backend cannot tell."""
        return None if self.closing is None else self.closing.shortest(self.closing.start)

    @abstractmethod
    def _matcher(self) -> Matcher: ...


class GrammarState:
    """One row's position in its grammar and the tokens it may pick next.

    `bits` always holds the current allowed tokens (EOS excluded), so the
    batch mask needs no backend call, and `complete` is known right after
    the token that completed the grammar. `budget`, when set, is how many
    tokens the row may still generate; `closed_early` says whether it ever
    narrowed the row's choices."""

    def __init__(self, grammar: Grammar, matcher: Matcher, budget: int | None = None):
        self.grammar = grammar
        self._matcher = matcher
        self.bits = torch.zeros((1, words_for(grammar.vocab_size)), dtype=torch.int32)
        self.accepting = False
        self.complete = False
        self.budget = budget
        self.closed_early = False
        self._refresh()

    def advance(self, token_id: int) -> None:
        """Consume the row's newly sampled token (not EOS: the row ends there)."""
        if not self._matcher.consume(int(token_id)):
            raise RuntimeError(
                f"the {self.grammar.backend} grammar rejected token {token_id}, which its own mask allowed"
            )
        if self.budget is not None:
            self.budget -= 1
        self._refresh()

    def _refresh(self) -> None:
        self.bits.zero_()
        self._matcher.fill(self.bits)
        self.bits &= self.grammar.not_eos_bits
        self._close_in_time()
        self.accepting = self._matcher.accepting
        # Nothing but EOS left: the grammar is complete. (A dead end that does
        # not accept cannot happen with a backend's own mask; stop it anyway.)
        self.complete = not bool(self.bits.any())

    def _close_in_time(self) -> None:
        """Leave only the tokens after which the answer can still be complete
        within the budget."""
        closing = self.grammar.closing  # never None while there is a budget (Grammar.start)
        if self.budget is None or self.budget < 1 or closing is None:
            return
        state = self._matcher.automaton_state
        tokens = closing.within(state, self.budget) if state is not None else None
        if tokens is not None:
            self.bits &= ids_to_bits(tokens, self.grammar.vocab_size)[None, :]
            self.closed_early = True


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
