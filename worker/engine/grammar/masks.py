"""The batch's banned-token mask from its rows' grammar states."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from worker.engine.bans import TokenBans
from worker.engine.grammar.base import GrammarState
from worker.engine.grammar.bitmask import unpack_bits


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
