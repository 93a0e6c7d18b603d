"""The bytes each token id stands for (what outlines-core indexes)."""

from __future__ import annotations

from worker.engine.grammar import token_bytes


def test_token_bytes_match_the_tokenizer(tokenizer):
    table = token_bytes(tokenizer)
    assert tokenizer.eos_token_id not in table  # special tokens are never constrained text
    for token_id in range(100, 5000, 37):
        text = tokenizer.decode([token_id])
        if "\ufffd" not in text:
            assert table[token_id] == text.encode(), token_id
