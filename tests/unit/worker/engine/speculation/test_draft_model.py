"""Drafting with a draft model (worker.engine.speculation.draft_model): its proposals are
its greedy tokens, whatever its cache held before; it must share the model's tokens;
rows drafting with it say exactly what they say without drafting (a draft model that is
the model itself drafts what the model says, so most drafts are kept)."""

from __future__ import annotations

import copy

import pytest
import torch

from shared.settings import WorkerSettings
from tests.support.engine_runs import hf_greedy, llama, run_with_joins
from worker import main as worker_main
from worker.engine.engine import Engine
from worker.engine.rows import GenerationParams, RowRequest
from worker.engine.speculation.draft_model import DraftCursor, DraftModel, DraftModelMismatch
from worker.engine.speculation.drafting import Drafting


@pytest.fixture(scope="module")
def draft(tiny_model_dir, tiny_model, tokenizer) -> DraftModel:
    """The tiny model drafting for itself (a copy of it, loaded again)."""
    return DraftModel.over(llama(tiny_model_dir), tokenizer, tiny_model, tokenizer, name="self")


def test_proposals_are_the_draft_models_greedy_tokens(draft, tiny_model, tokenizer):
    prompt = tokenizer("The capital of France is")["input_ids"]
    assert draft.propose(DraftCursor(), prompt, 7) == hf_greedy(tiny_model, prompt, 7)
    assert draft.propose(DraftCursor(), prompt, 0) == []


def test_a_cursor_forgets_what_the_model_did_not_keep(draft, tokenizer):
    """A row's cursor is reused step after step: its cache then holds drafts the model
    rejected, which must not shape the next proposals."""
    cursor = DraftCursor()
    tokens = tokenizer("one two three four")["input_ids"]
    for kept in (6, 0, 2, 3):  # all kept, none kept, some kept (then another token chosen)
        proposed = draft.propose(cursor, tokens, 6)
        assert proposed == draft.propose(DraftCursor(), tokens, 6)
        chosen = (proposed[kept] + 1) % 1000 if kept < len(proposed) else 17
        tokens = [*tokens, *proposed[:kept], chosen]
        assert cursor.seen == [*tokens[: len(tokens) - kept - 1], *proposed[:-1]]


def test_the_draft_model_must_share_the_models_tokens(tiny_model_dir, tiny_model, tokenizer):
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<a-token-the-model-lacks>"])
    other_vocab = other.get_vocab()
    swapped = dict(tokenizer.get_vocab())
    first, second = sorted(swapped)[:2]
    swapped[first], swapped[second] = swapped[second], swapped[first]

    class Swapped:
        def get_vocab(self):
            return swapped

    with pytest.raises(DraftModelMismatch, match="tokenizer differs"):
        DraftModel.over(tiny_model, Swapped(), tiny_model, tokenizer)
    # a draft model knowing fewer tokens (the model adds, e.g., an image token) drafts below them
    narrower = DraftModel.over(tiny_model, tokenizer, tiny_model, other)
    assert narrower.vocab_size == len(tokenizer.get_vocab()) < len(other_vocab)
    assert DraftModel.over(tiny_model, tokenizer, tiny_model, tokenizer).cost == pytest.approx(1.0)


def rows_for(engine: Engine, prompts, params) -> list[RowRequest]:
    return [
        RowRequest(key=i, prompt_ids=engine.encode_prompt(text), params=p)
        for i, (text, p) in enumerate(zip(prompts, params, strict=True))
    ]


def test_rows_drafting_with_the_model_say_what_they_say_without(draft, tiny_model, tokenizer):
    prompts = ["The capital of France is", "a b c", "Once upon a time", "Hello"]
    params = [
        GenerationParams(max_new_tokens=30, min_new_tokens=30),
        GenerationParams(max_new_tokens=25, temperature=0.9, top_k=0, top_p=0.9, seed=3),
        GenerationParams(max_new_tokens=13, repetition_penalty=1.4),
        GenerationParams(max_new_tokens=20, no_repeat_ngram_size=2),
    ]
    results = {}
    for speculative in ("draft", "off"):
        engine = Engine(tiny_model, tokenizer, speculative=speculative, draft_model=draft)
        rows = rows_for(engine, prompts, params)
        completions = run_with_joins(engine, rows[:2], {3: rows[2:3], 5: rows[3:]})
        results[speculative] = {key: (c.tokens, c.text, c.finish_reason) for key, c in completions.items()}
        if speculative == "draft":
            counters = engine.drafting.counters
            assert 0 < counters["model"].kept < counters["model"].drafted and counters["ngram"].drafted == 0
    assert results["draft"] == results["off"]
    assert results["off"][0][0] == hf_greedy(tiny_model, rows[0].prompt_ids, 30, min_new_tokens=30)


def test_auto_does_not_draft_with_a_model_as_big_as_the_model(draft, tiny_model, tokenizer):
    engine = Engine(tiny_model, tokenizer, speculative="auto", draft_model=draft)
    rows = rows_for(engine, ["The capital of France is"], [GenerationParams(max_new_tokens=20)])
    run_with_joins(engine, rows)
    assert engine.drafting.counters["model"].drafted == 0  # each drafted token costs a whole step


def test_in_bfloat16_the_worker_drafts_with_its_draft_model_and_says_the_same(
    served, smollm2_shaped_model_dir
):
    settings = WorkerSettings(
        redis_url="x",
        model=str(smollm2_shaped_model_dir),
        draft_model=str(smollm2_shaped_model_dir),
        speculative="draft",
        dtype="bfloat16",
    )
    draft = worker_main.load_draft_model(settings, served)
    assert draft is not None and next(draft.model.parameters()).dtype == torch.bfloat16
    assert draft.cost > 0  # timed against the model
    lengths = (50, 20, 90)
    prompts = [[(7 * i + 3 * n) % 30000 + 100 for i in range(length)] for n, length in enumerate(lengths)]
    params = [
        GenerationParams(max_new_tokens=20),
        GenerationParams(max_new_tokens=20, temperature=0.8, top_k=20, seed=7),
        GenerationParams(max_new_tokens=16),
    ]
    results = {}
    for speculative in ("draft", "off"):
        engine = Engine(served.model, served.tokenizer, speculative=speculative, draft_model=draft)
        pairs = enumerate(zip(prompts, params, strict=True))
        rows = [RowRequest(key=i, prompt_ids=p, params=q) for i, (p, q) in pairs]
        completions = run_with_joins(engine, rows[:2], {4: rows[2:]})
        results[speculative] = {key: c.tokens for key, c in completions.items()}
        if speculative == "draft":
            assert engine.drafting.counters["model"].kept > 0
    assert results["draft"] == results["off"]


def test_a_worker_refuses_draft_without_a_draft_model():
    with pytest.raises(ValueError, match="--draft-model"):
        worker_main.check_speculation(WorkerSettings(redis_url="x", speculative="draft"))
    with pytest.raises(ValueError, match="draft model"):
        Drafting("draft")  # the engine's policy refuses it too
