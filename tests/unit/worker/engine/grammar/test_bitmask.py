"""Token bitmasks: int32 words of 32 token ids each."""

from __future__ import annotations

import torch

from worker.engine.grammar import ids_to_bits, unpack_bits


def test_bitmasks_round_trip():
    ids = [0, 1, 31, 32, 33, 63, 64, 99]
    bits = ids_to_bits(ids, 100)
    assert bits.dtype == torch.int32 and bits.shape == (4,)
    assert unpack_bits(bits[None, :], 100)[0].nonzero().flatten().tolist() == ids
