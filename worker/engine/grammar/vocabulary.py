"""The bytes each token id stands for, which outlines-core builds its index from.

Read from the tokenizer's vocabulary and decoder, not by decoding each id:
byte-level BPE and byte-fallback tokens are single bytes that alone may not
be valid UTF-8.
"""

from __future__ import annotations

import json

from transformers import PreTrainedTokenizerBase


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
    """The decoder step types of a fast tokenizer ("ByteLevel", "ByteFallback",
    "Metaspace", ...), nested sequences included; empty for a slow tokenizer."""
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
