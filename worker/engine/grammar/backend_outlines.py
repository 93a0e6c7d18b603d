"""The outlines-core backend: a regex (or the regex outlines-core derives from a
JSON Schema) becomes a token-level index of the whole vocabulary; each step is
a table lookup. Compiling is the expensive part, hence the cache (compiler.py).
The index is a token automaton, so its grammars close answers within a budget
(closing.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from shared import constraints
from worker.engine.grammar.base import Backend, ConstraintError, Grammar, Matcher
from worker.engine.grammar.closing import ClosingTable
from worker.engine.grammar.vocabulary import token_bytes


class _OutlinesMatcher(Matcher):
    def __init__(self, index: Any):
        from outlines_core import Guide

        self._guide = Guide(index)

    def fill(self, bits: torch.Tensor) -> None:
        self._guide.write_mask_into(bits.data_ptr(), bits.numel(), bits.element_size())

    def consume(self, token_id: int) -> bool:
        try:
            self._guide.advance(token_id=token_id, return_tokens=False)
        except ValueError:
            return False
        return True

    @property
    def accepting(self) -> bool:
        return self._guide.is_finished()

    @property
    def automaton_state(self) -> int:
        return self._guide.get_state()


class _OutlinesGrammar(Grammar):
    backend = constraints.OUTLINES

    def __init__(self, index: Any, vocab_size: int, not_eos_bits: torch.Tensor, eos_token_ids: Sequence[int]):
        closing = ClosingTable(
            index.get_transitions(), index.get_final_states(), index.get_initial_state(), eos_token_ids
        )
        super().__init__(vocab_size, not_eos_bits, closing)
        self.index = index

    def _matcher(self) -> Matcher:
        return _OutlinesMatcher(self.index)


class OutlinesBackend(Backend):
    name = constraints.OUTLINES

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_token_ids: Sequence[int], vocab_size: int):
        super().__init__(tokenizer, eos_token_ids, vocab_size)
        import outlines_core

        self._outlines_core = outlines_core
        by_bytes: dict[bytes, list[int]] = {}
        for token_id, raw in token_bytes(tokenizer).items():
            if token_id < vocab_size and token_id not in self.eos_token_ids:
                by_bytes.setdefault(raw, []).append(token_id)
        self.vocabulary = outlines_core.Vocabulary(min(self.eos_token_ids), by_bytes)

    def regex(self, pattern: str) -> Grammar:
        try:
            index = self._outlines_core.Index(pattern, self.vocabulary)
        except (ValueError, RuntimeError) as exc:
            raise ConstraintError(f"the outlines backend cannot compile this regex: {exc}") from None
        return _OutlinesGrammar(index, self.vocab_size, self.not_eos_bits, self.eos_token_ids)

    def json_schema(self, schema: str) -> Grammar:
        # outlines-core's JSON regex allows one optional space after separators, never more.
        try:
            pattern = self._outlines_core.json_schema.build_regex_from_schema(schema)
        except (ValueError, RuntimeError) as exc:
            raise ConstraintError(f"the outlines backend cannot compile this JSON schema: {exc}") from None
        return self.regex(pattern)
