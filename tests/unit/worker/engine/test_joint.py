"""Rows joining a running batch in the decode step's own forward
(worker.engine.joint): one model call per step, and every row still answers
what `generate` answers for its prompt alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.support.engine_runs import PROMPTS, collect, hf_greedy, llama
from worker.engine.engine import Engine
from worker.engine.joint import JointForward
from worker.engine.models.fused_layers import fuse_layers
from worker.engine.rows import GenerationParams, RowRequest

GREEDY = GenerationParams(max_new_tokens=12, min_new_tokens=12)


@pytest.fixture(scope="module")
def plain(tiny_model_dir) -> nn.Module:
    return llama(tiny_model_dir)


@pytest.fixture(scope="module")
def fused(tiny_model_dir) -> nn.Module:
    model = llama(tiny_model_dir)
    fuse_layers(model)
    return model


class CountingCalls:
    """Counts the calls of the model's own forward and of the joint forward."""

    def __init__(self, engine: Engine, monkeypatch):
        self.model_calls = self.joint_calls = 0
        run_model, joint = engine._run_model, engine._joint

        def counted_model(*args, **kwargs):
            self.model_calls += 1
            return run_model(*args, **kwargs)

        def counted_joint(*args, **kwargs):
            self.joint_calls += 1
            return joint(*args, **kwargs)

        monkeypatch.setattr(engine, "_run_model", counted_model)
        monkeypatch.setattr(engine, "_joint", counted_joint)


def rows(engine: Engine, prompts, first_key: int = 0) -> list[RowRequest]:
    return [
        RowRequest(key=first_key + i, prompt_ids=engine.encode_prompt(text), params=GREEDY)
        for i, text in enumerate(prompts)
    ]


def test_only_fused_llama_models_get_a_joint_forward(plain, fused, tokenizer):
    assert JointForward.for_model(plain) is None
    assert JointForward.for_model(fused) is not None
    assert Engine(fused, tokenizer).can_join([]) is False  # nothing running yet
    assert Engine(fused, tokenizer).joint_prefill and not Engine(plain, tokenizer).joint_prefill
    assert not Engine(fused, tokenizer, joint_prefill=False).joint_prefill
    padded = Engine(fused, tokenizer, prefill_width_multiple=8)  # a prefill's width is its own there
    padded.add(rows(padded, PROMPTS[:1]))
    assert not padded.joint_prefill and not padded.can_join(rows(padded, PROMPTS[1:2], first_key=1))


def test_rows_joining_mid_flight_answer_what_generate_answers_alone(plain, fused, tokenizer, monkeypatch):
    engine = Engine(fused, tokenizer)
    calls = CountingCalls(engine, monkeypatch)
    first, *later = rows(engine, PROMPTS)
    engine.add([first])
    completions: dict = {}
    steps = 0
    while engine.has_work:
        # a newcomer every other step, two at once at the end: rows of every length join rows
        # already decoding, and rows leave while others join
        joining = []
        if later and steps % 2 == 1:
            joining = [later.pop(0)] if len(later) != 2 else [later.pop(0), later.pop(0)]
            assert engine.can_join(joining)
        collect(engine.step(joining), completions)
        steps += 1
        if engine._batch is not None:
            assert engine._batch.lengths == engine._batch.attention_mask.sum(dim=1).tolist()
    assert calls.joint_calls == 3
    assert calls.model_calls == steps - calls.joint_calls  # the first prefill, and plain decode steps
    for row in rows(engine, PROMPTS):
        assert completions[row.key].tokens == hf_greedy(plain, row.prompt_ids, 12, min_new_tokens=12), row.key


def test_a_joint_forward_gives_the_logits_of_separate_forwards(fused, tokenizer):
    joint, separate = Engine(fused, tokenizer), Engine(fused, tokenizer)
    running = rows(joint, PROMPTS[:3])
    newcomers = rows(joint, PROMPTS[3:], first_key=10)
    for engine in (joint, separate):
        engine.add(running)
        engine.step()
    joint.step(newcomers)
    separate.step()
    separate.add(newcomers)
    assert joint.keys == separate.keys
    # (the separate prefill pads the two newcomers to one width: rounding apart)
    torch.testing.assert_close(joint._batch.logits, separate._batch.logits, atol=1e-4, rtol=1e-4)
    for engine in (joint, separate):  # and the caches they leave decode the same
        engine.step()
    torch.testing.assert_close(joint._batch.logits, separate._batch.logits, atol=1e-4, rtol=1e-4)


def test_the_newcomers_join_even_when_every_running_row_ends(plain, fused, tokenizer):
    engine = Engine(fused, tokenizer)
    short = RowRequest(
        key="short", prompt_ids=engine.encode_prompt("Hello"), params=GenerationParams(max_new_tokens=1)
    )
    engine.add([short])
    assert engine.rows_ending_by_length == 1  # its next token is its last, whatever it is
    newcomer = rows(engine, PROMPTS[1:2])[0]
    completions: dict = {}
    collect(engine.step([newcomer]), completions)
    assert completions["short"].finish_reason == "length"
    assert engine.keys == [newcomer.key]
    while engine.has_work:
        collect(engine.step(), completions)
    assert completions[newcomer.key].tokens == hf_greedy(plain, newcomer.prompt_ids, 12, min_new_tokens=12)


def test_a_row_that_cannot_join_changes_nothing(fused, tokenizer):
    engine = Engine(fused, tokenizer)
    running = rows(engine, PROMPTS[:2])
    engine.add(running)
    keys = engine.keys
    too_long = RowRequest(key="bad", prompt_ids=[tokenizer.vocab_size + 5], params=GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        engine.step([too_long])
    with pytest.raises(ValueError, match="already in the batch"):
        engine.step([running[0]])
    assert engine.keys == keys and engine._batch.logits is not None  # not sampled, not advanced
    assert all(row.completion_tokens == 0 for row in engine._batch.rows)


def test_rows_added_together_in_the_batch_invariant_mode_are_prefilled_in_one_packed_forward(
    plain, fused, tokenizer, monkeypatch
):
    engine = Engine(fused, tokenizer)  # batch invariant: no padded prefill of several rows
    calls = CountingCalls(engine, monkeypatch)
    added = rows(engine, PROMPTS)
    engine.add(added)
    assert (calls.joint_calls, calls.model_calls) == (1, 0)
    completions: dict = {}
    while engine.has_work:
        collect(engine.step(), completions)
    for row in added:
        assert completions[row.key].tokens == hf_greedy(plain, row.prompt_ids, 12, min_new_tokens=12), row.key
