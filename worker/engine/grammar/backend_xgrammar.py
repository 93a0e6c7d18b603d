"""The xgrammar backend: a pushdown automaton with a per-state token-mask cache.

xgrammar is optional (installed with --no-deps); without it, choosing this
backend raises BackendUnavailable, which the API reports as 501."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from shared import constraints
from worker.engine.grammar.base import Backend, BackendUnavailable, ConstraintError, Grammar, Matcher


class _XGrammarMatcher(Matcher):
    def __init__(self, compiled: Any, stop_tokens: list[int]):
        import xgrammar

        self._matcher = xgrammar.GrammarMatcher(compiled, override_stop_tokens=stop_tokens)

    def fill(self, bits: torch.Tensor) -> None:
        self._matcher.fill_next_token_bitmask(bits, 0)

    def consume(self, token_id: int) -> bool:
        return self._matcher.accept_token(token_id)

    @property
    def accepting(self) -> bool:
        return self._matcher.is_completed()


class _XGrammarGrammar(Grammar):
    backend = constraints.XGRAMMAR

    def __init__(self, compiled: Any, stop_tokens: list[int], vocab_size: int, not_eos_bits: torch.Tensor):
        super().__init__(vocab_size, not_eos_bits)
        self.compiled = compiled
        self._stop_tokens = stop_tokens

    def _matcher(self) -> Matcher:
        return _XGrammarMatcher(self.compiled, self._stop_tokens)


class XGrammarBackend(Backend):
    name = constraints.XGRAMMAR

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_token_ids: Sequence[int], vocab_size: int):
        super().__init__(tokenizer, eos_token_ids, vocab_size)
        try:
            import xgrammar
        except ImportError as exc:
            raise BackendUnavailable(
                f"the xgrammar backend is not installed on this worker ({exc}); "
                "install it with `pip install --no-deps xgrammar` plus apache-tvm-ffi"
            ) from None
        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=self.eos_token_ids
        )
        # mmserve keeps its own bounded cache; xgrammar's would grow without bound.
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def _grammar(self, compiled: Any) -> Grammar:
        return _XGrammarGrammar(compiled, self.eos_token_ids, self.vocab_size, self.not_eos_bits)

    def regex(self, pattern: str) -> Grammar:
        try:
            return self._grammar(self._compiler.compile_regex(pattern))
        except (ValueError, RuntimeError) as exc:
            raise ConstraintError(f"the xgrammar backend cannot compile this regex: {exc}") from None

    def json_schema(self, schema: str) -> Grammar:
        try:
            compiled = self._compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=True)
        except (ValueError, RuntimeError) as exc:
            raise ConstraintError(f"the xgrammar backend cannot compile this JSON schema: {exc}") from None
        return self._grammar(compiled)
