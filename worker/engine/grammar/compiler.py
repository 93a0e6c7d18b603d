"""The backend registry and the compiled-grammar cache, one per tokenizer.

`compiler_for` hands everything decoding with one tokenizer object (and the
same EOS ids and vocabulary size) the same `GrammarCompiler`, so engines over
one tokenizer share one cache. The cache is keyed by (backend, kind, value):
the same regex under two backends is compiled twice.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from shared import constraints
from worker.engine.grammar.backend_llguidance import LLGuidanceBackend
from worker.engine.grammar.backend_outlines import OutlinesBackend
from worker.engine.grammar.backend_xgrammar import XGrammarBackend
from worker.engine.grammar.base import Backend, ConstraintError, Grammar
from worker.engine.rows import Constraint

# Compiled grammars kept per tokenizer. An outlines index of a large schema
# is big, so the cache is bounded.
GRAMMAR_CACHE_SIZE = 64

# Each name of shared.constraints.BACKENDS -> its class: a new backend is a module and a line here.
BACKEND_CLASSES: dict[str, type[Backend]] = {
    constraints.OUTLINES: OutlinesBackend,
    constraints.XGRAMMAR: XGrammarBackend,
    constraints.LLGUIDANCE: LLGuidanceBackend,
}


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0


class GrammarCompiler:
    """Compiles constraints for one tokenizer and caches the results
    (least recently used first out, at most `cache_size`)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        eos_token_ids: Collection[int],
        vocab_size: int,
        *,
        cache_size: int = GRAMMAR_CACHE_SIZE,
    ):
        if not eos_token_ids:
            raise ValueError("constrained decoding needs at least one end-of-sequence id")
        self.tokenizer = tokenizer
        self.eos_token_ids = sorted(eos_token_ids)
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self.stats = CacheStats()
        self._backends: dict[str, Backend] = {}
        self._cache: OrderedDict[tuple[str, str, str], Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def backend(self, name: str) -> Backend:
        """The backend `name` for this tokenizer, set up on first use."""
        try:
            name = constraints.resolve_backend(name)
        except constraints.UnknownBackend as exc:
            raise ConstraintError(str(exc)) from None
        if name not in self._backends:
            self._backends[name] = BACKEND_CLASSES[name](self.tokenizer, self.eos_token_ids, self.vocab_size)
        return self._backends[name]

    def is_cached(self, constraint: Constraint) -> bool:
        return _key(constraint) in self._cache

    def compile(self, constraint: Constraint) -> Grammar:
        """The compiled grammar for `constraint`, from the cache when it is there."""
        key = _key(constraint)
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
                self.stats.hits += 1
                return grammar
            self.stats.misses += 1
            grammar = self._compile(constraint)
            self._cache[key] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return grammar

    def _compile(self, constraint: Constraint) -> Grammar:
        backend = self.backend(constraint.backend)
        if constraint.kind == constraints.REGEX:
            return backend.regex(constraint.value)
        if constraint.kind == constraints.JSON_SCHEMA:
            return backend.json_schema(constraint.value)
        raise ConstraintError(f"unknown constraint kind {constraint.kind!r}")

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()


def _key(constraint: Constraint) -> tuple[str, str, str]:
    return (constraint.backend, constraint.kind, constraint.value)


_compilers: weakref.WeakKeyDictionary[Any, dict[tuple[tuple[int, ...], int], GrammarCompiler]] = (
    weakref.WeakKeyDictionary()
)


def compiler_for(
    tokenizer: PreTrainedTokenizerBase, eos_token_ids: Collection[int], vocab_size: int
) -> GrammarCompiler:
    """The compiler (and so the grammar cache) shared by everything that
    decodes with this tokenizer object, these EOS ids and this vocabulary size."""
    key = (tuple(sorted(eos_token_ids)), vocab_size)
    per_tokenizer = _compilers.setdefault(tokenizer, {})
    if key not in per_tokenizer:
        per_tokenizer[key] = GrammarCompiler(tokenizer, eos_token_ids, vocab_size)
    return per_tokenizer[key]
