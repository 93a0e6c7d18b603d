"""Rows that check drafted tokens say exactly what they say without drafting: greedy
and seeded sampling, alone and in mixed batches with rows joining, with token budgets,
bans, penalties and grammars (worker.engine.engine).

Random test models never repeat themselves, so prompt lookup would draft nothing the
model keeps; these tests draft with an oracle instead: the answer a run without
drafting gave, with a wrong token now and then. What a draft is does not matter to
the checking, only whether the model keeps it."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import torch

from tests.support.engine_runs import hf_greedy, llama, run_with_joins
from tests.support.vlm_runs import RED
from worker.engine.adapters import AdapterCatalog, LoraAdapters
from worker.engine.engine import Engine
from worker.engine.models.fused_layers import fuse_layers
from worker.engine.rows import Constraint, GenerationParams, RowRequest
from worker.engine.speculation.drafting import Drafting, RowDrafts

REPEATING = "one two three four five six seven one two three four five six seven one two three four"


class Oracle(Drafting):
    """Drafts what each row answered in a run without drafting (found by its prompt),
    one draft in `wrong_every` with a token changed."""

    def __init__(
        self, answers: dict[tuple[int, ...], list[int]], draft_tokens: int = 4, wrong_every: int = 3
    ):
        super().__init__("ngram", draft_tokens)
        self.answers, self.wrong_every, self.drafts_made = answers, wrong_every, 0

    def drafts(self, rows: Sequence[RowDrafts | None], room: Sequence[int]) -> list[list[int]]:
        wanted = []
        for state, left in zip(rows, room, strict=True):
            history = state.tokens if state is not None else []
            prompt = max((p for p in self.answers if tuple(history[: len(p)]) == p), key=len, default=None)
            if prompt is None or left <= 0:
                wanted.append([])
                continue
            done = len(history) - len(prompt)
            draft = list(self.answers[prompt][done : done + min(self.draft_tokens, left)])
            self.drafts_made += 1
            if draft and self.drafts_made % self.wrong_every == 0:
                draft[len(draft) // 2] += 1
            wanted.append(draft)
        return wanted


def with_and_without_drafts(
    make_engine, rows: list[RowRequest], join=None, **oracle
) -> tuple[dict, dict, Engine]:
    """The rows' (tokens, text, finish reason) without drafting and with the oracle's
    drafts, and the drafting engine."""
    plain = run_with_joins(make_engine(), rows, join)
    engine = make_engine()
    every_row = [*rows, *[row for joining in (join or {}).values() for row in joining]]
    engine.drafting = Oracle({tuple(r.prompt_ids): plain[r.key].tokens for r in every_row}, **oracle)
    drafted = run_with_joins(engine, rows, join)
    return (
        {key: (c.tokens, c.text, c.finish_reason) for key, c in plain.items()},
        {key: (c.tokens, c.text, c.finish_reason) for key, c in drafted.items()},
        engine,
    )


def rows_for(engine: Engine, prompts, params: GenerationParams, prefix: str = "") -> list[RowRequest]:
    return [
        RowRequest(key=f"{prefix}{i}", prompt_ids=engine.encode_prompt(text), params=params)
        for i, text in enumerate(prompts)
    ]


def kept_some_not_all(engine: Engine) -> bool:
    counters = engine.drafting.total
    return 0 < counters.kept < counters.drafted


@pytest.fixture(scope="module")
def fused(tiny_model_dir):
    model = llama(tiny_model_dir)
    fuse_layers(model)
    return model


def test_greedy_rows_checking_drafts_equal_generate(tiny_model, tokenizer):
    def make() -> Engine:
        return Engine(tiny_model, tokenizer)

    params = GenerationParams(max_new_tokens=40, min_new_tokens=40)
    rows = rows_for(make(), [REPEATING, "The capital of France is", "a b c"], params)
    plain, drafted, engine = with_and_without_drafts(make, rows, draft_tokens=5)
    assert drafted == plain and kept_some_not_all(engine)
    for row in rows:
        assert drafted[row.key][0] == hf_greedy(tiny_model, row.prompt_ids, 40, min_new_tokens=40)


@pytest.mark.parametrize("invariant", [True, False])
def test_mixed_batches_with_joins_say_what_they_say_without_drafting(fused, tokenizer, invariant):
    def make() -> Engine:
        return Engine(fused, tokenizer, batch_invariant=invariant)

    engine = make()
    first = rows_for(engine, [REPEATING, "Once upon a time"], GenerationParams(max_new_tokens=30))
    later = rows_for(
        engine, ["x y x y x y", "1 2 3 1 2 3", "Hello"], GenerationParams(max_new_tokens=17), "late"
    )
    plain, drafted, engine = with_and_without_drafts(make, first, {3: later[:1], 6: later[1:]}, wrong_every=2)
    assert drafted == plain and kept_some_not_all(engine)


def test_budgets_and_bans_end_on_the_same_token(tiny_model, tokenizer):
    def make() -> Engine:
        return Engine(tiny_model, tokenizer)

    cases = [
        GenerationParams(max_new_tokens=13),
        GenerationParams(max_new_tokens=30, min_new_tokens=25),
        GenerationParams(max_new_tokens=30, no_repeat_ngram_size=2),
        GenerationParams(max_new_tokens=30, repetition_penalty=1.5),
        GenerationParams(max_new_tokens=30, temperature=0.9, top_k=0, top_p=0.9, seed=3),
    ]
    for params in cases:
        rows = rows_for(make(), [REPEATING, "Hello"], params)
        plain, drafted, engine = with_and_without_drafts(make, rows, draft_tokens=8)
        assert drafted == plain and kept_some_not_all(engine), params


def test_a_draft_the_grammar_forbids_is_never_kept(tiny_model, tokenizer):
    def make() -> Engine:
        return Engine(tiny_model, tokenizer)

    constraint = Constraint(kind="regex", value=r"(ab ){3,12}ab")
    rows = [
        RowRequest(
            key=0,
            prompt_ids=make().encode_prompt(REPEATING),
            params=GenerationParams(max_new_tokens=60),
            constraint=constraint,
        )
    ]
    plain, drafted, engine = with_and_without_drafts(make, rows, wrong_every=2)
    assert drafted == plain and kept_some_not_all(engine)
    assert drafted[0][1].startswith("ab ab ab")


def test_in_bfloat16_greedy_and_seeded_rows_say_exactly_what_they_say_without_drafting(served):
    assert served.dtype == torch.bfloat16

    def make() -> Engine:
        return Engine(served.model, served.tokenizer)

    rng = random.Random(1)
    prompts = [[rng.randrange(1000, 40000) for _ in range(length)] for length in (70, 40, 130, 9)]
    params = [
        GenerationParams(max_new_tokens=24),
        GenerationParams(max_new_tokens=24, temperature=0.8, top_k=20, seed=7),
        GenerationParams(max_new_tokens=20, repetition_penalty=1.3),
        GenerationParams(max_new_tokens=16, temperature=1.2, top_k=0, seed=11),
    ]
    rows = [
        RowRequest(key=i, prompt_ids=p, params=q)
        for i, (p, q) in enumerate(zip(prompts, params, strict=True))
    ]
    plain, drafted, engine = with_and_without_drafts(
        make, rows[:2], {2: rows[2:3], 5: rows[3:]}, draft_tokens=6
    )
    assert drafted == plain and kept_some_not_all(engine)


def test_prompt_lookup_drafts_change_nothing_either(tiny_model, tokenizer):
    params = GenerationParams(max_new_tokens=30)
    results = {}
    for speculative in ("ngram", "off"):
        engine = Engine(tiny_model, tokenizer, speculative=speculative)
        rows = rows_for(engine, [REPEATING, "x y x y x y x y x y"], params)
        results[speculative] = {k: c.tokens for k, c in run_with_joins(engine, rows).items()}
    assert results["ngram"] == results["off"]


def test_lora_rows_checking_drafts_say_what_they_say_without(tiny_model_dir, tokenizer, tiny_lora_dir):
    base = llama(tiny_model_dir)
    adapters = LoraAdapters(base, AdapterCatalog(directory=tiny_lora_dir), max_loaded=2)

    def make() -> Engine:
        return Engine(base, tokenizer, adapters=adapters)

    engine = make()
    params, ids = GenerationParams(max_new_tokens=16), engine.encode_prompt(REPEATING)
    adapter_names = ("alpha", None, "beta")
    rows = [RowRequest(key=str(n), prompt_ids=ids, params=params, adapter=n) for n in adapter_names]
    plain, drafted, engine = with_and_without_drafts(make, rows)
    assert drafted == plain and kept_some_not_all(engine)
    assert len({tuple(tokens) for tokens, _, _ in plain.values()}) == 3  # the adapters do change the answers


def test_rows_about_images_check_drafts_too(vlm):
    def make() -> Engine:
        return vlm.engine()

    reason = vlm.engine(speculative="ngram").speculation_off_reason
    if reason is not None:  # sliding-window layers cannot forget tokens
        assert "gemma3" in vlm.name and "other than full attention" in reason
        return
    engine = make()
    prompts = engine.encode_image_prompts(["Describe it.", "What colour?"], [RED], use_chat_template=True)
    params = GenerationParams(max_new_tokens=12)
    rows = [
        RowRequest(key=i, prompt_ids=p.prompt_ids, params=params, image_features=p.image_features)
        for i, p in enumerate(prompts)
    ]
    plain, drafted, engine = with_and_without_drafts(make, rows)
    assert drafted == plain and kept_some_not_all(engine)
