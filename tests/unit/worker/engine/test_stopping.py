"""Per-row stopping criteria and token bans."""

from __future__ import annotations

import random

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
)

from worker.engine.rows import GenerationParams
from worker.engine.stopping import NGramIndex, Stopping, banned_tokens

EOS = 2


def test_eos_token_finishes_the_row_with_reason_eos():
    stopping = Stopping(GenerationParams(max_new_tokens=10), [5, 6], eos_token_ids={EOS, 0})
    assert stopping.update(7) is None
    assert stopping.update(0) == "eos"
    assert stopping.generated == 2


def test_max_new_tokens_finishes_the_row_with_reason_length():
    stopping = Stopping(GenerationParams(max_new_tokens=3), [5], eos_token_ids={EOS})
    assert [stopping.update(t) for t in (7, 8, 9)] == [None, None, "length"]


def test_eos_on_the_last_allowed_token_reports_eos():
    stopping = Stopping(GenerationParams(max_new_tokens=2), [5], eos_token_ids={EOS})
    stopping.update(7)
    assert stopping.update(EOS) == "eos"


def test_a_finished_row_accepts_no_more_tokens():
    stopping = Stopping(GenerationParams(max_new_tokens=1), [5], eos_token_ids={EOS})
    stopping.update(7)
    with pytest.raises(RuntimeError):
        stopping.update(8)


def test_min_new_tokens_masks_eos_until_reached():
    params = GenerationParams(min_new_tokens=2, max_new_tokens=10)
    stoppings = [Stopping(params, [5], eos_token_ids={EOS, 3}), Stopping(GenerationParams(), [5], {EOS, 3})]
    for step in range(3):
        bans = banned_tokens(stoppings, vocab_size=6)
        mask = bans.mask() if bans is not None else None
        # Hugging Face's processor on the same history agrees with the mask.
        input_ids = torch.tensor([[5] + [4] * step])
        hf = MinNewTokensLengthLogitsProcessor(1, 2, [EOS, 3])(input_ids, torch.zeros(1, 6))
        if step < 2:
            assert mask is not None
            assert mask[0].tolist() == [False, False, True, True, False, False]
            assert not mask[1].any()
            assert torch.isinf(hf[0]).tolist() == mask[0].tolist()
        else:
            assert mask is None
            assert not torch.isinf(hf).any()
        for stopping in stoppings:
            stopping.update(4)


def test_no_bans_gives_no_bans():
    assert banned_tokens([Stopping(GenerationParams(), [1, 2, 1], {EOS})], vocab_size=5) is None


def test_no_repeat_ngram_bans_tokens_that_complete_a_seen_ngram():
    index = NGramIndex(3, [1, 2, 3, 1, 2])
    assert set(index.banned()) == {3}  # (1, 2) was followed by 3
    index.append(4)
    assert set(index.banned()) == set()  # (2, 4) is new


def test_no_repeat_unigram_bans_every_seen_token():
    assert set(NGramIndex(1, [4, 5, 4]).banned()) == {4, 5}


def test_no_repeat_ngram_waits_for_enough_tokens():
    assert list(NGramIndex(4, [1, 1]).banned()) == []


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_no_repeat_ngram_bans_match_hf_over_prompt_and_completion(size: int):
    rng = random.Random(size)
    vocab = 6
    prompt = [rng.randrange(vocab) for _ in range(7)]
    stopping = Stopping(GenerationParams(no_repeat_ngram_size=size, max_new_tokens=100), prompt, set())
    history = list(prompt)
    hf = NoRepeatNGramLogitsProcessor(size)
    for _ in range(15):
        expected = torch.isinf(hf(torch.tensor([history]), torch.zeros(1, vocab)))[0]
        bans = banned_tokens([stopping], vocab_size=vocab)
        got = bans.mask()[0] if bans is not None else torch.zeros(vocab, dtype=torch.bool)
        assert got.tolist() == expected.tolist()
        token = rng.randrange(vocab)
        stopping.update(token)
        history.append(token)


def test_cancel_sets_reason_cancelled():
    stopping = Stopping(GenerationParams(), [1], {EOS})
    assert stopping.cancel() == "cancelled"
    assert stopping.finish_reason == "cancelled"
