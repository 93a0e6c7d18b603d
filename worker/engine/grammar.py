"""Constrained decoding: grammars that decide, token by token, what a row may generate.

A `Constraint` (rows.py) is data: a regex or a JSON Schema and the backend
that enforces it. A `GrammarCompiler` (one per tokenizer, see `compiler_for`)
turns it into a `Grammar` — compiled once per (backend, constraint,
tokenizer) and kept in a bounded LRU cache — and each row gets its own
`GrammarState` from `Grammar.start()`. Three backends do the work:

- outlines (outlines-core): the regex, or the regex outlines-core derives
  from the schema, becomes a token-level index of the whole vocabulary;
  each step is a table lookup.
- xgrammar: a pushdown automaton with a per-state token-mask cache.
- llguidance: a lazy lexer/Earley parser computing masks on demand.

Every backend writes the allowed tokens of a row as a bitmask (32 token ids
per int32 word, bit i of word w = token 32*w + i), which the state keeps
after each token. `grammar_mask` stacks the constrained rows' bitmasks and
unpacks them with tensor operations into one [B, V] "banned" mask for the
sampler's vectorised pass — no Python loop over the vocabulary.

End of sequence belongs to the engine, not the backends: a constrained row
may pick one of the model's EOS ids only while its grammar accepts, and a
row whose grammar accepts and allows nothing else is complete (the engine
stops it with finish_reason "stop").
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from shared import constraints
from worker.engine.bans import TokenBans
from worker.engine.rows import Constraint

log = logging.getLogger(__name__)

# Compiled grammars kept per tokenizer. An outlines index of a large schema
# can take tens of MB, so the cache is bounded.
GRAMMAR_CACHE_SIZE = 64

_BITS = 32
_SHIFTS = torch.arange(_BITS, dtype=torch.int32)

# JSON layout: compact separators (outlines-core: one optional space), never
# unbounded whitespace, which a weak model can repeat until max_new_tokens.


class ConstraintError(ValueError):
    """A constraint that cannot be enforced (bad regex or schema, a feature the
    backend does not support). The message is meant for the API's client."""

    status = 400


class BackendUnavailable(ConstraintError):
    """The backend's package is missing or cannot run on this machine."""

    status = 501


def words_for(vocab_size: int) -> int:
    """int32 words in a bitmask of `vocab_size` tokens."""
    return (vocab_size + _BITS - 1) // _BITS


def ids_to_bits(token_ids: Collection[int], vocab_size: int) -> torch.Tensor:
    """A [W] int32 bitmask with the bits of `token_ids` set."""
    allowed = torch.zeros(words_for(vocab_size) * _BITS, dtype=torch.bool)
    ids = [t for t in token_ids if 0 <= t < vocab_size]
    if ids:
        allowed[torch.tensor(ids, dtype=torch.long)] = True
    weights = torch.ones(_BITS, dtype=torch.int64) << _SHIFTS.long()
    packed = (allowed.view(-1, _BITS).long() * weights).sum(dim=1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_bits(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, W] int32 bitmasks -> [R, vocab_size] bool (True = allowed)."""
    shifts = _SHIFTS.to(bits.device)
    unpacked = ((bits.unsqueeze(-1) >> shifts) & 1).bool()
    return unpacked.view(bits.shape[0], -1)[:, :vocab_size]


# -- per-row state -------------------------------------------------------------


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


def grammar_mask(
    states: Sequence[GrammarState | None],
    vocab_size: int,
    eos_token_ids: Collection[int],
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """[B, V] bool: the tokens each constrained row may NOT pick next (EOS
    allowed only while the row's grammar accepts); False for unconstrained
    rows. None when no row is constrained."""
    rows = [index for index, state in enumerate(states) if state is not None]
    if not rows:
        return None
    constrained = [states[index] for index in rows]
    bits = torch.cat([state.bits for state in constrained]).to(device)  # type: ignore[union-attr]
    allowed = unpack_bits(bits, vocab_size)
    eos = [t for t in eos_token_ids if 0 <= t < vocab_size]
    if eos:
        accepting = torch.tensor([s.accepting for s in constrained], dtype=torch.bool, device=device)  # type: ignore[union-attr]
        allowed[:, torch.tensor(eos, dtype=torch.long, device=device)] = accepting[:, None]
    if len(rows) == len(states):
        return ~allowed
    banned = torch.zeros((len(states), vocab_size), dtype=torch.bool, device=device)
    banned[torch.tensor(rows, dtype=torch.long, device=device)] = ~allowed
    return banned


def merge_bans(soft: TokenBans | None, grammar: torch.Tensor | None) -> TokenBans | torch.Tensor | None:
    """The grammar's bans are hard, the other bans (min_new_tokens' EOS,
    no_repeat_ngram) soft: where both together would ban every token of a
    row, that row keeps only the grammar's bans. The soft bans stay pairs
    when no row has a grammar; with one, the result is a [B, V] mask."""
    if grammar is None:
        return soft
    if soft is None:
        return grammar
    merged = soft.mask() | grammar
    stuck = merged.all(dim=1, keepdim=True)
    return torch.where(stuck, grammar, merged)


# -- compiled grammars, per backend -------------------------------------------


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


class _Backend(ABC):
    """What one backend needs to know about a tokenizer, built once per tokenizer."""

    name: str

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_token_ids: Sequence[int], vocab_size: int):
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.not_eos_bits = ~ids_to_bits(self.eos_token_ids, vocab_size)[None, :]

    @abstractmethod
    def regex(self, pattern: str) -> Grammar: ...

    @abstractmethod
    def json_schema(self, schema: str) -> Grammar: ...


# outlines-core


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


class _OutlinesGrammar(Grammar):
    backend = constraints.OUTLINES

    def __init__(self, index: Any, vocab_size: int, not_eos_bits: torch.Tensor):
        super().__init__(vocab_size, not_eos_bits)
        self.index = index

    def _matcher(self) -> Matcher:
        return _OutlinesMatcher(self.index)


class _OutlinesBackend(_Backend):
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
        return _OutlinesGrammar(index, self.vocab_size, self.not_eos_bits)

    def json_schema(self, schema: str) -> Grammar:
        try:
            pattern = self._outlines_core.json_schema.build_regex_from_schema(schema)
        except (ValueError, RuntimeError) as exc:
            raise ConstraintError(f"the outlines backend cannot compile this JSON schema: {exc}") from None
        return self.regex(pattern)


# xgrammar


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


class _XGrammarBackend(_Backend):
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


# llguidance


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
        self.template = template  # a fresh matcher; rows start from copies (building one parses the grammar)

    def _matcher(self) -> Matcher:
        return _LLGuidanceMatcher(self.template.deep_copy())


class _LLGuidanceBackend(_Backend):
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


_BACKENDS: dict[str, type[_Backend]] = {
    constraints.OUTLINES: _OutlinesBackend,
    constraints.XGRAMMAR: _XGrammarBackend,
    constraints.LLGUIDANCE: _LLGuidanceBackend,
}


# -- the compiler and its cache -----------------------------------------------


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
        self._backends: dict[str, _Backend] = {}
        self._cache: OrderedDict[tuple[str, str, str], Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def backend(self, name: str) -> _Backend:
        """The backend `name` for this tokenizer, set up on first use."""
        try:
            name = constraints.resolve_backend(name)
        except constraints.UnknownBackend as exc:
            raise ConstraintError(str(exc)) from None
        if name not in self._backends:
            self._backends[name] = _BACKENDS[name](self.tokenizer, self.eos_token_ids, self.vocab_size)
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
            backend = self.backend(constraint.backend)
            if constraint.kind == constraints.REGEX:
                grammar = backend.regex(constraint.value)
            elif constraint.kind == constraints.JSON_SCHEMA:
                grammar = backend.json_schema(constraint.value)
            else:
                raise ConstraintError(f"unknown constraint kind {constraint.kind!r}")
            self._cache[key] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return grammar

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


# -- the bytes each token stands for (outlines-core needs them) ----------------


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2 byte-level BPE: the character that stands for each byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars: dict[str, int] = {chr(b): b for b in printable}
    extra = 0
    for byte in range(256):
        if byte not in printable:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _decoder_kinds(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds: set[str] = set()

    def walk(node: dict) -> None:
        kinds.add(node.get("type", ""))
        if node.get("type") == "Replace" and node.get("pattern", {}).get("String") == "▁":
            kinds.add("Metaspace")
        for child in node.get("decoders") or []:
            walk(child)

    walk(decoder)
    return kinds


def token_bytes(tokenizer: PreTrainedTokenizerBase) -> dict[int, bytes]:
    """The bytes each ordinary token id adds to decoded text. Special tokens
    (skipped by the detokenizer, so never part of constrained text) are left out."""
    special: set[int] = set(getattr(tokenizer, "all_special_ids", ()))
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special.update(index for index, token in added.items() if getattr(token, "special", False))
    kinds = _decoder_kinds(tokenizer)
    alphabet = _byte_level_alphabet() if "ByteLevel" in kinds else None
    result: dict[int, bytes] = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id in special:
            continue
        if token_id in added:  # ordinary added tokens are inserted as they are
            result[token_id] = token.encode()
        elif alphabet is not None and all(char in alphabet for char in token):
            result[token_id] = bytes(alphabet[char] for char in token)
        elif "ByteFallback" in kinds and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            result[token_id] = bytes([int(token[3:5], 16)])
        elif "Metaspace" in kinds:
            result[token_id] = token.replace("▁", " ").encode()
        else:
            result[token_id] = token.encode()
    return {token_id: raw for token_id, raw in result.items() if raw}
