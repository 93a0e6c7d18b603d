"""Token bitmasks: the allowed tokens of one row as int32 words.

32 token ids per word, bit i of word w = token 32*w + i. Every backend writes
this layout; words are signed, so bit 31 set makes a word negative.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import torch

_BITS = 32
_SHIFTS = torch.arange(_BITS, dtype=torch.int32)


def words_for(vocab_size: int) -> int:
    """int32 words in a bitmask of `vocab_size` tokens."""
    return (vocab_size + _BITS - 1) // _BITS


def ids_to_bits(token_ids: Collection[int] | np.ndarray, vocab_size: int) -> torch.Tensor:
    """A [W] int32 bitmask with the bits of `token_ids` set."""
    allowed = np.zeros(words_for(vocab_size) * _BITS, dtype=bool)
    ids = np.asarray(token_ids if isinstance(token_ids, np.ndarray) else list(token_ids), dtype=np.int64)
    allowed[ids[(ids >= 0) & (ids < vocab_size)]] = True
    # Little-endian bit and byte order: bit i of word w is token 32*w + i.
    words = np.packbits(allowed, bitorder="little").view("<i4").astype(np.int32)
    return torch.from_numpy(words)


def unpack_bits(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, W] int32 bitmasks -> [R, vocab_size] bool (True = allowed)."""
    shifts = _SHIFTS.to(bits.device)
    unpacked = ((bits.unsqueeze(-1) >> shifts) & 1).bool()
    return unpacked.view(bits.shape[0], -1)[:, :vocab_size]
