"""Budget-aware closing: a constrained answer that max_new_tokens would cut is
completed by the shortest way its grammar allows, so it always parses.

The table on hand-made automata, then the engine on the tiny random model
(sampled at temperature 1.0, the nastiest token sequences) with budgets down to
the shortest answer."""

from __future__ import annotations

import json
import re

import pytest

from shared import constraints
from tests.support.engine_runs import collect, run
from tests.unit.worker.engine.grammar.test_decoding import REGEXES, SCHEMAS, valid
from worker.engine.engine import Engine
from worker.engine.grammar import ConstraintError
from worker.engine.grammar.closing import ClosingTable
from worker.engine.rows import Constraint, GenerationParams, RowRequest

# -- the table ---------------------------------------------------------------

# 0 -a-> 1 -b-> 2 (accepting); 0 -x-> 0; 1 -y-> 3 -z-> 2; 0 -e-> 4, from which nothing accepts
A, B, X, Y, Z, E, EOS = 10, 11, 12, 13, 14, 15, 99
AUTOMATON = {0: {A: 1, X: 0, E: 4}, 1: {B: 2, Y: 3}, 3: {Z: 2}, 2: {EOS: 2}}


def test_shortest_completions_are_counted_backwards_from_accepting_states():
    table = ClosingTable(AUTOMATON, accepting=[2], start=0, ignore=[EOS])
    assert [table.shortest(s) for s in (0, 1, 2, 3)] == [2, 1, 0, 1]
    assert table.shortest(4) is None
    assert table.shortest(table.start) == 2


def test_a_budget_keeps_only_the_tokens_that_still_reach_an_accepting_state():
    table = ClosingTable(AUTOMATON, accepting=[2], start=0, ignore=[EOS])
    start, middle = 0, 1
    # Far from the budget nothing is narrowed (the dead end 4 is the grammar's business).
    assert table.within(middle, 3) is None
    # 2 tokens left in state 1: b (then done) or y (then z) both fit.
    assert table.within(middle, 2) is None
    assert table.within(middle, 1).tolist() == [B]
    assert table.within(start, 2).tolist() == [A]
    assert table.within(start, 3) is None  # x then a, b still fits
    assert table.within(2, 1) is None  # EOS is ignored: nothing to narrow


# -- the engine ----------------------------------------------------------------


def _shortest(engine: Engine, constraint: Constraint) -> int:
    shortest = engine.prepare_constraint(constraint).shortest_answer()
    assert shortest is not None
    return shortest


def _corpus(backend: str) -> list[tuple[str, str, Constraint]]:
    cases = []
    for name, schema in SCHEMAS.items():
        value = json.dumps(constraints.normalize_schema(schema))
        cases.append((name, "json", Constraint(constraints.JSON_SCHEMA, value, backend)))
    for name, pattern in REGEXES.items():
        cases.append(
            (name, "regex", Constraint(constraints.REGEX, constraints.normalize_regex(pattern), backend))
        )
    return cases


@pytest.mark.parametrize("backend", constraints.CLOSING_BACKENDS)
def test_every_answer_is_complete_whatever_the_budget(engine, backend):
    rows, specs = [], {}
    for name, kind, constraint in _corpus(backend):
        shortest = _shortest(engine, constraint)
        for extra in (0, 1, 3, 8):
            for seed in (1, 2):
                key = (name, extra, seed)
                specs[key] = (kind, SCHEMAS.get(name) if kind == "json" else REGEXES[name])
                params = GenerationParams(
                    temperature=1.0, top_k=0, max_new_tokens=shortest + extra, seed=seed
                )
                prompt = engine.encode_prompt("Answer in the requested format:")
                rows.append(RowRequest(key=key, prompt_ids=prompt, params=params, constraint=constraint))
    completions = run(engine, rows)
    invalid = {key: c.text for key, c in completions.items() if not valid(*specs[key], c.text)}
    assert not invalid, f"answers cut by the budget: {invalid}"
    closed = [key for key, c in completions.items() if c.outputs[-1].closed_early]
    assert closed, "no budget was ever tight enough to close an answer"
    budgets = {row.key: row.params.max_new_tokens for row in rows}
    for key, completion in completions.items():
        assert len(completion.tokens) <= budgets[key]
        if completion.outputs[-1].closed_early:
            assert completion.finish_reason == "length", key
        else:
            assert completion.finish_reason in ("stop", "length"), key


def test_an_answer_the_budget_never_narrows_is_unchanged(engine, tiny_model, tokenizer):
    # Greedy, float32: the same tokens with and without closing while the budget is ample.
    plain = Engine(tiny_model, tokenizer, close_in_time=False)
    rows = [
        RowRequest(
            key=name,
            prompt_ids=engine.encode_prompt("Answer in the requested format:"),
            params=GenerationParams(max_new_tokens=200),
            constraint=constraint,
        )
        for name, _, constraint in _corpus(constraints.OUTLINES)
    ]
    closing, without = run(engine, rows), run(plain, rows)
    finished = [key for key, c in without.items() if c.finish_reason == "stop"]
    assert finished
    for key in finished:
        assert closing[key].tokens == without[key].tokens
        assert closing[key].finish_reason == "stop"
        assert not closing[key].outputs[-1].closed_early


def test_closing_changes_only_the_end_of_an_answer(engine, tiny_model, tokenizer):
    # Greedy: the closed answer follows the free one until the budget first narrows it.
    plain = Engine(tiny_model, tokenizer, close_in_time=False)
    constraint = Constraint(constraints.REGEX, "[a-z ]+z", constraints.OUTLINES)
    row = RowRequest(
        key="r",
        prompt_ids=engine.encode_prompt("Write"),
        params=GenerationParams(max_new_tokens=12),
        constraint=constraint,
    )
    closed, free = run(engine, [row])["r"], run(plain, [row])["r"]
    assert free.finish_reason == "length" and not re.fullmatch("[a-z ]+z", free.text)
    assert re.fullmatch("[a-z ]+z", closed.text), closed.text
    assert closed.outputs[-1].closed_early and closed.finish_reason == "length"
    assert len(closed.tokens) <= 12
    assert closed.tokens[:-1] == free.tokens[: len(closed.tokens) - 1]


def test_a_budget_below_the_shortest_answer_is_refused(engine):
    constraint = Constraint(constraints.REGEX, "(abc ){20}", constraints.OUTLINES)
    shortest = _shortest(engine, constraint)
    row = RowRequest(
        key="r",
        prompt_ids=engine.encode_prompt("x"),
        params=GenerationParams(max_new_tokens=shortest - 1),
        constraint=constraint,
    )
    with pytest.raises(ConstraintError, match=f"max_new_tokens {shortest - 1} is too few.*{shortest} tokens"):
        engine.add([row])
    assert not engine.has_work
    fits = RowRequest(
        key="r",
        prompt_ids=row.prompt_ids,
        params=GenerationParams(max_new_tokens=shortest),
        constraint=constraint,
    )
    assert run(engine, [fits])["r"].text == "abc " * 20


def test_a_row_joining_a_running_batch_closes_in_time_too(engine):
    schema = json.dumps(constraints.normalize_schema(SCHEMAS["nested"]))
    constraint = Constraint(constraints.JSON_SCHEMA, schema, constraints.OUTLINES)
    shortest = _shortest(engine, constraint)
    sampled = GenerationParams(temperature=1.0, top_k=0, max_new_tokens=shortest + 2, seed=4)
    engine.add(
        [RowRequest(key="first", prompt_ids=engine.encode_prompt("a"), params=sampled, constraint=constraint)]
    )
    completions = {}
    collect(engine.step(), completions)
    joining = [
        RowRequest(
            key="joined", prompt_ids=engine.encode_prompt("b c"), params=sampled, constraint=constraint
        )
    ]
    if engine.can_join(joining):
        collect(engine.step(joining), completions)
    else:
        engine.add(joining)
    while engine.has_work:
        collect(engine.step(), completions)
    for key in ("first", "joined"):
        assert valid("json", SCHEMAS["nested"], completions[key].text), completions[key].text
