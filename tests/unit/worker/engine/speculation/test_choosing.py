"""Which drafted tokens a row keeps, on hand-made logits (Engine._choose): each position's
token is the one the row would choose there without drafts; a row keeps drafts while they
equal those tokens, and yields one token past the last draft it kept."""

from __future__ import annotations

import pytest
import torch

from worker.engine.batch import Batch
from worker.engine.engine import Engine
from worker.engine.rows import GenerationParams, RowRequest

VOCAB_TOKENS = (100, 200, 300, 400, 500)


@pytest.fixture
def drafting(tiny_model, tokenizer) -> Engine:
    return Engine(tiny_model, tokenizer, speculative="ngram")


def batch_with(engine: Engine, fed: list[list[int]], best: list[list[int]], params=None) -> Batch:
    """Rows that fed `fed[i]` drafts, whose logits after each fed token favour `best[i][p]`."""
    requests = [
        RowRequest(key=i, prompt_ids=[1, 2, 3], params=params or GenerationParams(max_new_tokens=20))
        for i in range(len(fed))
    ]
    batch = engine._new_batch(requests, [None] * len(requests))
    positions = max(len(f) for f in fed) + 1
    batch.logits = torch.zeros(len(fed), positions, engine.vocab_size)
    for row, (drafts, favourites) in enumerate(zip(fed, best, strict=True)):
        batch.rows[row].drafts.fed = drafts
        batch.rows[row].fed_tokens = positions
        for position, token in enumerate(favourites):
            batch.logits[row, position, token] = 10.0
    return batch


def chosen(outputs) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {}
    for output in outputs:
        tokens.setdefault(output.key, []).append(output.token_id)
    return tokens


def test_drafts_are_kept_while_they_equal_the_chosen_tokens(drafting):
    a, b, c, d, e = VOCAB_TOKENS
    batch = batch_with(
        drafting,
        fed=[[a, b, c], [a, b, c], [a, b, c], []],
        best=[[a, b, d, e], [a, b, c, e], [d, a, b, c], [e]],
    )
    outputs, keep, last, dropped = drafting._choose(batch)
    assert chosen(outputs) == {0: [a, b, d], 1: [a, b, c, e], 2: [d], 3: [e]}
    assert keep == [0, 1, 2, 3]
    assert last == {0: d, 1: e, 2: d, 3: e}
    assert dropped == [1, 0, 3, 3]  # of the 4 fed tokens each: the drafts not kept, and fillers
    assert [row.drafts.kept for row in batch.rows] == [2, 3, 0, 0]
    assert [row.completion_tokens for row in batch.rows] == [3, 4, 1, 1]


def test_a_row_reaching_max_new_tokens_stops_inside_its_drafts(drafting):
    a, b, c, _, _ = VOCAB_TOKENS
    two = GenerationParams(max_new_tokens=2)
    batch = batch_with(drafting, fed=[[a, b, c]], best=[[a, b, c, c]], params=two)
    outputs, keep, _, _ = drafting._choose(batch)
    assert [o.token_id for o in outputs] == [a, b]
    assert outputs[-1].finish_reason == "length" and keep == []


def test_a_sampled_row_draws_once_per_token_it_yields(drafting):
    a, b, c, d, _ = VOCAB_TOKENS
    params = GenerationParams(max_new_tokens=20, temperature=1.0, top_k=0, seed=5)
    batch = batch_with(drafting, fed=[[a, b, c]], best=[[a, b, d, d]], params=params)
    batch.logits *= 5  # near-certain choices: a, b, then d (not the draft c)
    generator = batch.sampler.generators[0]
    before = generator.get_state()
    outputs, _, _, dropped = drafting._choose(batch)
    assert [o.token_id for o in outputs] == [a, b, d] and dropped == [1]
    replay = torch.Generator().set_state(before)
    for _ in range(3):
        torch.rand((), generator=replay, dtype=torch.float64)
    assert torch.equal(replay.get_state(), generator.get_state())  # three draws, as three plain steps


def test_sampled_rows_checking_drafts_keep_the_models_distribution(drafting):
    """Over many seeds, the tokens a sampled row yields at each position follow the
    model's distribution there, whatever was drafted (a statistical check, fixed seeds)."""
    a, b, c, d, _ = VOCAB_TOKENS
    first = {a: 0.5, b: 0.3, c: 0.2}  # the row's distribution after its fed token
    second = {c: 0.6, d: 0.4}  # after the draft `a`, if kept
    trials = 1500
    counts_first: dict[int, int] = {}
    counts_second: dict[int, int] = {}
    for seed in range(trials):
        params = GenerationParams(max_new_tokens=20, temperature=1.0, top_k=0, seed=seed)
        batch = batch_with(drafting, fed=[[a, b]], best=[[]], params=params)
        batch.logits.fill_(-1e9)
        for token, p in first.items():
            batch.logits[0, 0, token] = float(torch.tensor(p).log())
        for token, p in second.items():
            batch.logits[0, 1, token] = float(torch.tensor(p).log())
        batch.logits[0, 2, d] = 0.0
        outputs, _, _, _ = drafting._choose(batch)
        tokens = [o.token_id for o in outputs]
        counts_first[tokens[0]] = counts_first.get(tokens[0], 0) + 1
        if tokens[0] == a:
            counts_second[tokens[1]] = counts_second.get(tokens[1], 0) + 1
    for counts, distribution in ((counts_first, first), (counts_second, second)):
        total = sum(counts.values())
        assert set(counts) <= set(distribution)
        for token, p in distribution.items():
            spread = 4 * (p * (1 - p) / total) ** 0.5
            assert abs(counts.get(token, 0) / total - p) < spread, (token, counts, total)
