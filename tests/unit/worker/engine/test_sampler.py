"""Sampler maths on hand-made logits, checked against Hugging Face's own
logits processors where one exists."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from worker.engine.bans import TokenBans
from worker.engine.rows import GenerationParams
from worker.engine.sampler import Sampler, greedy_tokens

SAMPLED = {"top_k": 0, "temperature": 1.0}


def sampler_for(*params: GenerationParams, prompts: list[list[int]] | None = None, vocab: int = 8) -> Sampler:
    return Sampler.from_params(list(params), prompts or [[] for _ in params], vocab)


def hf_distribution(logits: torch.Tensor, *warpers) -> torch.Tensor:
    scores = logits.clone()
    for warper in warpers:
        scores = warper(torch.zeros((scores.shape[0], 1), dtype=torch.long), scores)
    return scores.softmax(dim=-1)


def test_greedy_row_takes_the_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, 1.0, 1.0, 0.0]])
    sampler = sampler_for(GenerationParams(), GenerationParams(temperature=0.0, top_k=50), vocab=4)
    assert sampler(logits).tolist() == [1, 0]
    assert sampler.probabilities(logits).tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]


def test_temperature_divides_logits_before_softmax():
    logits = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    sampler = sampler_for(
        GenerationParams(temperature=0.5, top_k=0), GenerationParams(temperature=2.0, top_k=0)
    )
    got = sampler.probabilities(logits)
    torch.testing.assert_close(got[0], hf_distribution(logits[:1], TemperatureLogitsWarper(0.5))[0])
    torch.testing.assert_close(got[1], hf_distribution(logits[1:], TemperatureLogitsWarper(2.0))[0])


def test_top_k_keeps_the_k_best_tokens():
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0, 0.0, -1.0, 5.0, 0.5]])
    got = sampler_for(GenerationParams(top_k=3)).probabilities(logits)
    assert torch.nonzero(got[0]).flatten().tolist() == [1, 3, 6]
    torch.testing.assert_close(got, hf_distribution(logits, TopKLogitsWarper(3)))


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    logits = probs.log()
    got = sampler_for(GenerationParams(top_k=0, top_p=0.8), vocab=5).probabilities(logits)
    # 0.4 + 0.3 = 0.7 < 0.8, so the third best (0.15) is needed; 0.1 and 0.05 go.
    assert torch.nonzero(got[0]).flatten().tolist() == [1, 3, 4]
    torch.testing.assert_close(got, hf_distribution(logits, TopPLogitsWarper(0.8)))


def test_temperature_top_k_and_top_p_compose_like_hf():
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(2)) * 3
    params = [
        GenerationParams(temperature=0.7, top_k=20, top_p=0.9),
        GenerationParams(temperature=1.3, top_k=0, top_p=0.5),
        GenerationParams(temperature=1.0, top_k=5, top_p=1.0),
    ]
    got = sampler_for(*params, vocab=64).probabilities(logits)
    for row, p in enumerate(params):
        warpers = [TemperatureLogitsWarper(p.temperature)]
        if p.top_k:
            warpers.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            warpers.append(TopPLogitsWarper(p.top_p))
        torch.testing.assert_close(got[row], hf_distribution(logits[row : row + 1], *warpers)[0])


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 3.0]])
    sampler = sampler_for(GenerationParams(repetition_penalty=2.0), prompts=[[0, 1, 4]], vocab=6)
    expected = torch.tensor([[1.0, -4.0, 1.0, -1.0, 0.25, 3.0]])
    torch.testing.assert_close(sampler.process(logits), expected)
    hf = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[0, 1, 4]]), logits.clone())
    torch.testing.assert_close(sampler.process(logits), hf)


def test_repetition_penalty_covers_generated_tokens_per_row():
    logits = torch.tensor([[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]])
    sampler = sampler_for(
        GenerationParams(repetition_penalty=2.0),
        GenerationParams(repetition_penalty=1.0),
        prompts=[[0], [0]],
        vocab=3,
    )
    sampler.record(torch.tensor([2, 1]))
    assert sampler.process(logits).tolist() == [[1.0, 2.0, 1.0], [2.0, 2.0, 2.0]]


def test_banned_tokens_are_never_picked():
    logits = torch.tensor([[1.0, 9.0, 2.0], [0.0, 9.0, 8.0]])
    banned = torch.tensor([[False, True, False], [False, True, True]])
    sampler = sampler_for(GenerationParams(), GenerationParams(**SAMPLED, seed=3), vocab=3)
    assert sampler(logits, banned).tolist() == [2, 0]
    assert sampler.probabilities(logits, banned)[:, 1].tolist() == [0.0, 0.0]


def test_banned_token_pairs_ban_what_the_same_mask_bans():
    logits = torch.tensor([[1.0, 9.0, 2.0], [0.0, 9.0, 8.0]])
    pairs = TokenBans.from_lists([0, 1, 1, 1], [1, 1, 2, 7], batch=2, vocab=3)  # 7: out of range
    assert pairs.mask().tolist() == [[False, True, False], [False, True, True]]
    sampler = sampler_for(GenerationParams(), GenerationParams(**SAMPLED, seed=3), vocab=3)
    assert sampler(logits, pairs).tolist() == [2, 0]
    torch.testing.assert_close(sampler.process(logits, pairs), sampler.process(logits, pairs.mask()))
    assert logits.tolist() == [[1.0, 9.0, 2.0], [0.0, 9.0, 8.0]]  # float32 logits are not changed


@pytest.mark.parametrize("as_pairs", [False, True])
def test_a_row_with_every_token_banned_ignores_the_bans(as_pairs):
    logits = torch.tensor([[1.0, 9.0, 2.0], [1.0, 9.0, 2.0]])
    banned = torch.tensor([[True, True, True], [False, True, False]])
    if as_pairs:
        banned = TokenBans.from_lists([0, 0, 0, 1], [0, 1, 2, 1], batch=2, vocab=3)
    assert sampler_for(GenerationParams(), GenerationParams(), vocab=3)(logits, banned).tolist() == [1, 2]


@pytest.mark.parametrize("vocab", [5, 2048, 3000, 49152, 151936])
def test_greedy_tokens_equal_argmax_ties_and_nan_included(vocab):
    generator = torch.Generator().manual_seed(vocab)
    scores = torch.randn(6, vocab, generator=generator).bfloat16().float()  # bfloat16 makes ties likely
    scores[1, :] = float("-inf")
    scores[2, [7 % vocab, vocab // 2, vocab - 1]] = 99.0  # equal maxima: the first wins
    scores[3, vocab - 1] = 99.0  # the maximum past the last whole block
    scores[4, vocab // 3] = float("nan")
    scores[5, :] = 0.0
    assert greedy_tokens(scores).tolist() == scores.argmax(dim=-1).tolist()


def test_sampled_tokens_stay_inside_top_k_and_top_p():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(4)) * 2
    sampler = sampler_for(GenerationParams(top_k=10, top_p=0.6, seed=5), vocab=50)
    allowed = set(torch.nonzero(sampler.probabilities(logits)[0]).flatten().tolist())
    drawn = {sampler(logits).item() for _ in range(300)}
    assert drawn <= allowed
    assert len(drawn) > 1


def test_sampling_frequencies_follow_the_distribution():
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
    sampler = sampler_for(GenerationParams(**SAMPLED, seed=6), vocab=4)
    draws = torch.tensor([sampler(probs.log()).item() for _ in range(3000)])
    frequencies = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(frequencies, probs[0], atol=0.03, rtol=0)


def test_seeded_row_draws_the_same_tokens_whatever_its_batch_mates():
    logits = torch.randn(1, 32, generator=torch.Generator().manual_seed(7))
    mine = GenerationParams(**SAMPLED, seed=42)

    def draws(sampler: Sampler, row: int, batch_logits: torch.Tensor) -> list[int]:
        return [sampler(batch_logits)[row].item() for _ in range(20)]

    alone = draws(sampler_for(mine, vocab=32), 0, logits)
    others = torch.randn(2, 32, generator=torch.Generator().manual_seed(8))
    first = draws(
        sampler_for(mine, GenerationParams(**SAMPLED), GenerationParams(), vocab=32),
        0,
        torch.cat([logits, others]),
    )
    last = draws(
        sampler_for(GenerationParams(**SAMPLED, seed=1), GenerationParams(), mine, vocab=32),
        2,
        torch.cat([others, logits]),
    )
    assert alone == first == last
    assert len(set(alone)) > 1


def test_rows_without_seed_get_different_random_seeds():
    sampler = sampler_for(GenerationParams(**SAMPLED), GenerationParams(**SAMPLED), GenerationParams())
    assert sampler.seeds[0] is not None and sampler.seeds[1] is not None
    assert sampler.seeds[0] != sampler.seeds[1]
    assert sampler.seeds[2] is None  # greedy rows draw nothing


def test_filter_keeps_each_rows_parameters_and_state():
    sampler = sampler_for(
        GenerationParams(top_k=3, temperature=0.5, seed=1),
        GenerationParams(),
        GenerationParams(top_p=0.5, top_k=0, repetition_penalty=1.5, seed=2),
        prompts=[[1], [2], [3]],
    )
    kept = sampler.filter([2, 0])
    assert kept.top_k.tolist() == [0, 3]
    assert kept.top_p.tolist() == [0.5, 1.0]
    assert kept.temperature.tolist() == [1.0, 0.5]
    assert kept.repetition_penalty.tolist() == [1.5, 1.0]
    assert kept.greedy.tolist() == [False, False]
    assert kept.seeds == [2, 1]
    assert kept.seen.nonzero().tolist() == [[0, 3], [1, 1]]


def test_concatenate_joins_rows_in_order():
    a = sampler_for(GenerationParams(seed=1, top_k=0), prompts=[[1]])
    b = sampler_for(GenerationParams(), GenerationParams(top_k=4, seed=9), prompts=[[2], [3]])
    joined = Sampler.concatenate([a, b])
    assert len(joined) == 3
    assert joined.greedy.tolist() == [False, True, False]
    assert joined.seeds == [1, None, 9]
    assert joined.seen.nonzero().tolist() == [[0, 1], [1, 2], [2, 3]]


@pytest.mark.parametrize("vocab", [3, 1000])
def test_draws_never_land_on_zero_probability_tokens(vocab: int):
    logits = torch.full((1, vocab), float("-inf"))
    logits[0, vocab - 1] = 0.0
    logits[0, 0] = 0.0
    sampler = sampler_for(GenerationParams(**SAMPLED, seed=11), vocab=vocab)
    assert {sampler(logits).item() for _ in range(200)} == {0, vocab - 1}


@pytest.mark.parametrize("spread", [0.1, 8.0], ids=["flat: full sort", "peaked: candidates suffice"])
def test_nucleus_over_a_large_vocabulary_matches_hf(spread: float):
    vocab = 5000
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(12)) * spread
    params = [GenerationParams(top_k=0, top_p=0.95, temperature=0.8), GenerationParams(top_k=0, top_p=0.3)]
    got = sampler_for(*params, vocab=vocab).probabilities(logits)
    for row, p in enumerate(params):
        expected = hf_distribution(
            logits[row : row + 1], TemperatureLogitsWarper(p.temperature), TopPLogitsWarper(p.top_p)
        )[0]
        assert torch.equal(got[row] > 0, expected > 0)
        torch.testing.assert_close(got[row], expected)


def test_top_k_rows_beside_unrestricted_rows_keep_their_own_cut():
    vocab = 3000
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(13)) * 3
    params = [
        GenerationParams(top_k=40),
        GenerationParams(**SAMPLED),
        GenerationParams(top_k=2000, top_p=0.9),
    ]
    got = sampler_for(*params, vocab=vocab).probabilities(logits)
    torch.testing.assert_close(got[0], hf_distribution(logits[:1], TopKLogitsWarper(40))[0])
    torch.testing.assert_close(got[1], logits[1].softmax(dim=-1))
    expected = hf_distribution(logits[2:], TopKLogitsWarper(2000), TopPLogitsWarper(0.9))[0]
    torch.testing.assert_close(got[2], expected)
