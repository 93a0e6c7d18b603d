"""Constrained decoding: grammars that decide, token by token, what a row may generate.

A `Constraint` (rows.py) is data: a regex or a JSON Schema and the backend that
enforces it. `compiler_for` gives the `GrammarCompiler` of a tokenizer, which
compiles it once into a `Grammar` (compiler.py: backend registry and cache);
each row gets its own `GrammarState` from `Grammar.start()` (base.py: the
interface), and `grammar_mask` turns the batch's states into one [B, V] banned
mask for the sampler (masks.py). One module per backend: backend_outlines,
backend_xgrammar, backend_llguidance.

End of sequence belongs to the engine, not the backends: a constrained row may
pick an EOS id only while its grammar accepts, and a row whose grammar accepts
and allows nothing else is complete (the engine stops it with "stop").
"""

from worker.engine.grammar.base import (
    Backend,
    BackendUnavailable,
    ConstraintError,
    Grammar,
    GrammarState,
    Matcher,
)
from worker.engine.grammar.bitmask import ids_to_bits, unpack_bits, words_for
from worker.engine.grammar.compiler import (
    BACKEND_CLASSES,
    GRAMMAR_CACHE_SIZE,
    CacheStats,
    GrammarCompiler,
    compiler_for,
)
from worker.engine.grammar.masks import grammar_mask, merge_bans
from worker.engine.grammar.vocabulary import token_bytes

__all__ = [
    "BACKEND_CLASSES",
    "GRAMMAR_CACHE_SIZE",
    "Backend",
    "BackendUnavailable",
    "CacheStats",
    "ConstraintError",
    "Grammar",
    "GrammarCompiler",
    "GrammarState",
    "Matcher",
    "compiler_for",
    "grammar_mask",
    "ids_to_bits",
    "merge_bans",
    "token_bytes",
    "unpack_bits",
    "words_for",
]
