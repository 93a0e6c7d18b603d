"""The llguidance backend: a lazy lexer and Earley parser computing masks on demand.

A compiled grammar is a fresh matcher kept as a template: rows start from deep
copies of it, because building a matcher parses the grammar again."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from shared import constraints
from worker.engine.grammar.base import Backend, BackendUnavailable, ConstraintError, Grammar, Matcher


class _LLGuidanceMatcher(Matcher):
    def __init__(self, matcher: Any):
        self._matcher = matcher

    def fill(self, bits: torch.Tensor) -> None:
        self._matcher.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * bits.element_size())

    def consume(self, token_id: int) -> bool:
        return self._matcher.consume_token(token_id) and not self._matcher.is_error()

    @property
    def accepting(self) -> bool:
        return self._matcher.is_accepting()


class _LLGuidanceGrammar(Grammar):
    backend = constraints.LLGUIDANCE

    def __init__(self, template: Any, vocab_size: int, not_eos_bits: torch.Tensor):
        super().__init__(vocab_size, not_eos_bits)
        self.template = template

    def _matcher(self) -> Matcher:
        return _LLGuidanceMatcher(self.template.deep_copy())


class LLGuidanceBackend(Backend):
    name = constraints.LLGUIDANCE

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_token_ids: Sequence[int], vocab_size: int):
        super().__init__(tokenizer, eos_token_ids, vocab_size)
        try:
            import llguidance
            import llguidance.hf
        except ImportError as exc:
            raise BackendUnavailable(
                f"the llguidance backend is not installed on this worker ({exc})"
            ) from None
        self._llguidance = llguidance
        self._tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=vocab_size, eos_token=self.eos_token_ids
        )

    def _compile(self, grammar: str, what: str) -> Grammar:
        error = self._llguidance.LLMatcher.validate_grammar(grammar, self._tokenizer)
        if error:
            raise ConstraintError(f"the llguidance backend cannot compile this {what}: {error}")
        template = self._llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if template.is_error():
            raise ConstraintError(
                f"the llguidance backend cannot compile this {what}: {template.get_error()}"
            )
        return _LLGuidanceGrammar(template, self.vocab_size, self.not_eos_bits)

    def regex(self, pattern: str) -> Grammar:
        return self._compile(self._llguidance.LLMatcher.grammar_from_regex(pattern), "regex")

    def json_schema(self, schema: str) -> Grammar:
        try:
            grammar = self._llguidance.LLMatcher.grammar_from_json_schema(
                schema, overrides=constraints.LLGUIDANCE_JSON_OPTIONS
            )
        except ValueError as exc:
            raise ConstraintError(f"the llguidance backend cannot compile this JSON schema: {exc}") from None
        return self._compile(grammar, "JSON schema")
