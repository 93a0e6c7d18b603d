"""Token bitmasks: the allowed tokens of one row as int32 words.

32 token ids per word, bit i of word w = token 32*w + i. Every backend writes
this layout; words are signed, so bit 31 set makes a word negative.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

_BITS = 32
_SHIFTS = torch.arange(_BITS, dtype=torch.int32)


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
