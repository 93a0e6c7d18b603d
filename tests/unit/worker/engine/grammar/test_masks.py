"""The batch's banned-token mask: grammar bans against the other bans."""

from __future__ import annotations

import torch

from worker.engine.bans import TokenBans
from worker.engine.grammar import merge_bans


def test_grammar_bans_win_over_the_other_bans():
    grammar = torch.tensor([[True, False, True], [False, False, True]])
    soft = TokenBans.from_lists([0, 1], [1, 0], batch=2, vocab=3)
    merged = merge_bans(soft, grammar)
    # Row 0: both together would ban every token, so only the grammar's bans stay.
    assert merged[0].tolist() == [True, False, True]
    assert merged[1].tolist() == [True, False, True]
    assert merge_bans(None, grammar) is grammar and merge_bans(soft, None) is soft
