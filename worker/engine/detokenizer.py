"""Incremental detokenisation: one row's completion as a stream of text deltas.

Token-by-token decoding renders leading spaces differently at the start of a decode
and splits multi-byte characters, so each step decodes a small window (the tokens
since the last clean point plus the new ones) and emits what the new tokens added.
The deltas concatenate to `tokenizer.decode(token_ids, skip_special_tokens=True,
clean_up_tokenization_spaces=False)`, so streamed and non-streamed text agree.

Easy to get wrong: text is held back while the window ends in U+FFFD, while the last
token is a SentencePiece byte-fallback token (a later byte can turn a valid "é" into
U+FFFDs, since a run of byte tokens is decoded as a whole) and across skipped special
tokens (byte runs continue across them); `flush` emits what is left when the row ends."""

from __future__ import annotations

import re
import weakref
from collections.abc import Collection

from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHARACTER = "\ufffd"
BYTE_FALLBACK_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

_held_ids_cache: weakref.WeakKeyDictionary[object, dict[bool, frozenset[int]]] = weakref.WeakKeyDictionary()


def held_token_ids(tokenizer: PreTrainedTokenizerBase, *, skip_special_tokens: bool = True) -> frozenset[int]:
    """Ids after which text is held back: byte-fallback tokens, plus special
    tokens when they are skipped. Computed once per tokenizer."""
    try:
        cached = _held_ids_cache.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: compute every time
        cached = {}
    if skip_special_tokens not in cached:
        get_vocab = getattr(tokenizer, "get_vocab", None)
        vocab: dict[str, int] = get_vocab() if get_vocab is not None else {}
        ids = {index for token, index in vocab.items() if BYTE_FALLBACK_TOKEN.fullmatch(token)}
        if skip_special_tokens:
            ids.update(getattr(tokenizer, "all_special_ids", ()))
            added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
            ids.update(index for index, token in added.items() if getattr(token, "special", False))
        cached[skip_special_tokens] = frozenset(ids)
    return cached[skip_special_tokens]


class Detokenizer:
    """Turns one row's generated token ids into text, a delta per token."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        skip_special_tokens: bool = True,
        held_ids: Collection[int] | None = None,
    ):
        """`held_ids` defaults to `held_token_ids(tokenizer)`."""
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._held_ids = (
            held_ids
            if held_ids is not None
            else held_token_ids(tokenizer, skip_special_tokens=skip_special_tokens)
        )
        self.token_ids: list[int] = []
        # token_ids[prefix_offset:read_offset] were emitted already and only
        # give context; token_ids[read_offset:] are not emitted yet.
        self._prefix_offset = 0
        self._read_offset = 0
        self._pieces: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _pending(self) -> str:
        """Text the not-yet-emitted tokens add after their context."""
        prefix = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.token_ids[self._prefix_offset :])
        return full[len(prefix) :]

    def push(self, token_id: int) -> str:
        """Add a generated token; the text it completes ("" while a character
        is incomplete or the token renders as nothing)."""
        token_id = int(token_id)
        self.token_ids.append(token_id)
        if token_id in self._held_ids:
            return ""
        delta = self._pending()
        if not delta or delta.endswith(REPLACEMENT_CHARACTER):
            return ""
        return self._emit(delta)

    def flush(self) -> str:
        """Everything still held back; call once when the row ends."""
        delta = self._pending()
        return self._emit(delta) if delta else ""

    def _emit(self, delta: str) -> str:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)
        self._pieces.append(delta)
        return delta

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._pieces)
