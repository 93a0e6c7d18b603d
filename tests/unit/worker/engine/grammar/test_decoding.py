"""Constrained decoding on the tiny random model: every backend, a corpus of
schemas and regexes sampled at temperature 1.0 (random weights make the
nastiest token sequences), mixed batches and the finishing rules."""

from __future__ import annotations

import json
import re
from collections.abc import Hashable

import jsonschema
import pytest

from api.answer_bounds import longest_json_answer, longest_regex_answer
from api.constraints import check_schema
from shared import constraints
from tests.support.engine_runs import Completion, collect, hf_greedy, run
from worker.engine.engine import Engine
from worker.engine.rows import Constraint, GenerationParams, RowRequest

BACKENDS = list(constraints.BACKENDS)

# Accepted by every backend (checked below against the API's own tables).
SCHEMAS: dict[str, dict] = {
    "flat": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["name", "age", "ok"],
    },
    "optional": {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "note": {"type": "string"}, "score": {"type": "number"}},
        "required": ["id"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"first": {"type": "string"}, "admin": {"type": "boolean"}},
                "required": ["first", "admin"],
            },
            "n": {"type": "integer"},
        },
        "required": ["user", "n"],
    },
    "array": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    "enum": {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, None]}},
        "required": ["colour", "size"],
    },
    "const": {"type": "object", "properties": {"v": {"const": "x"}}, "required": ["v"]},
    "pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
        "required": ["code"],
    },
    "nullable": {
        "type": "object",
        "properties": {"maybe": {"type": ["integer", "null"]}, "flag": {"type": "boolean"}},
        "required": ["maybe", "flag"],
    },
    "any_of": {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer"}, {"type": "boolean"}]}},
        "required": ["value"],
    },
    "ref": {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
        "required": ["a", "b"],
    },
    "tuple": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}], "items": False},
}

# Bounds only some backends enforce.
EXTRA_SCHEMAS: dict[str, dict[str, dict]] = {
    constraints.OUTLINES: {
        "short_string": {
            "type": "object",
            "properties": {"s": {"type": "string", "minLength": 1, "maxLength": 4}},
            "required": ["s"],
        },
    },
    constraints.XGRAMMAR: {
        "bounds": {
            "type": "object",
            "properties": {
                "n": {"type": "integer", "minimum": 3, "maximum": 40},
                "x": {"type": "number", "exclusiveMinimum": 0},
            },
            "required": ["n", "x"],
        },
    },
    constraints.LLGUIDANCE: {
        "bounds": {
            "type": "object",
            "properties": {
                "n": {"type": "integer", "minimum": 3, "maximum": 40},
                "s": {"type": "string", "maxLength": 4},
            },
            "required": ["n", "s"],
        },
    },
}

REGEXES = {
    "date": r"\d{4}-\d{2}-\d{2}",
    "email": r"[a-z0-9._]{1,10}@[a-z]{1,8}\.(com|org|net)",
    "phone": r"\(\d{3}\) \d{3}-\d{4}",
    "time": r"([01]\d|2[0-3]):[0-5]\d",
    "yes_no": r"(?i)yes|no",
    "word_list": r"\w{1,5}( \w{1,5}){0,2}",
}


def constrained_rows(engine: Engine, backend: str, seeds: list[int]) -> dict[Hashable, tuple[str, object]]:
    """Every schema and regex of the corpus, each with every seed: key -> (kind, constraint)."""
    prompt = engine.encode_prompt("Answer in the requested format:")
    cases: dict[Hashable, tuple[str, object]] = {}
    rows = []
    schemas = {**SCHEMAS, **EXTRA_SCHEMAS[backend]}
    for seed in seeds:
        for name, schema in schemas.items():
            constraint = Constraint(
                constraints.JSON_SCHEMA, json.dumps(constraints.normalize_schema(schema)), backend
            )
            cases[(name, seed)] = ("json", schema)
            rows.append((name, seed, constraint))
        for name, pattern in REGEXES.items():
            constraint = Constraint(constraints.REGEX, constraints.normalize_regex(pattern), backend)
            cases[(name, seed)] = ("regex", pattern)
            rows.append((name, seed, constraint))
    engine.add(
        [
            RowRequest(
                key=(name, seed),
                prompt_ids=prompt,
                params=GenerationParams(temperature=1.0, top_k=0, max_new_tokens=48, seed=seed),
                constraint=constraint,
            )
            for name, seed, constraint in rows
        ]
    )
    return cases


def _fits(kind: str, spec: object, backend: str, max_new_tokens: int) -> bool:
    if kind == "regex":
        longest = longest_regex_answer(constraints.normalize_regex(str(spec)))
    else:
        longest = longest_json_answer(constraints.normalize_schema(spec), backend)
    return longest is not None and longest <= max_new_tokens


def valid(kind: str, spec: object, text: str) -> bool:
    if kind == "regex":
        return re.fullmatch(str(spec), text, re.ASCII) is not None
    validator = jsonschema.Draft202012Validator(
        spec, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    try:
        return validator.is_valid(json.loads(text))
    except json.JSONDecodeError:
        return False


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_corpus_is_accepted_by_the_api_checks(backend):
    for schema in {**SCHEMAS, **EXTRA_SCHEMAS[backend]}.values():
        check_schema(schema, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_completed_output_matches_its_constraint(engine, backend):
    cases = constrained_rows(engine, backend, seeds=[1, 2, 3])
    completions: dict[Hashable, Completion] = {}
    while engine.has_work:
        collect(engine.step(), completions)
    assert completions.keys() == cases.keys()
    stopped = {key: c for key, c in completions.items() if c.finish_reason == "stop"}
    # A backend that closes answers in time leaves none cut; the others are given only
    # constraints whose every answer fits (the API's bound), and those all complete.
    if backend in constraints.CLOSING_BACKENDS:
        complete = completions
    else:
        complete = {
            key: c for key, c in completions.items() if _fits(*cases[key], backend, max_new_tokens=48)
        }
        assert complete, "no constraint of the corpus is bounded within the budget"
        assert all(c.finish_reason == "stop" for c in complete.values()), complete
    invalid = {key: c.text for key, c in {**stopped, **complete}.items() if not valid(*cases[key], c.text)}
    assert not invalid, f"{backend} produced outputs that violate their constraint: {invalid}"
    assert all(c.finish_reason in ("stop", "length") for c in completions.values())
    assert len(stopped) >= 0.5 * len(completions), {
        k: c.text for k, c in completions.items() if k not in stopped
    }


def test_a_row_stops_when_its_grammar_is_complete(engine):
    constraint = Constraint(constraints.REGEX, "abc", constraints.OUTLINES)
    params = GenerationParams(max_new_tokens=30, min_new_tokens=20)
    completions = run(
        engine,
        [RowRequest(key=0, prompt_ids=engine.encode_prompt("x"), params=params, constraint=constraint)],
    )
    # min_new_tokens never forces tokens the grammar forbids: the row stops at "abc".
    assert completions[0].text == "abc"
    assert completions[0].finish_reason == "stop"
    assert completions[0].outputs[-1].completion_tokens < 20


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_new_tokens_before_the_grammar_completes_is_length(engine, backend):
    constraint = Constraint(constraints.REGEX, "[a-z]{40}", backend)
    params = GenerationParams(max_new_tokens=3)
    completions = run(
        engine,
        [RowRequest(key=0, prompt_ids=engine.encode_prompt("x"), params=params, constraint=constraint)],
    )
    assert completions[0].finish_reason == "length"
    assert len(completions[0].tokens) == 3
    assert re.fullmatch("[a-z]*", completions[0].text)


@pytest.mark.parametrize("backend", BACKENDS)
def test_end_of_sequence_only_where_the_grammar_accepts(engine, backend):
    # "[0-9]+" accepts after one digit and may go on: the row ends on EOS
    # (reported as "stop") or at max_new_tokens, never on EOS before a digit.
    constraint = Constraint(constraints.REGEX, "[0-9]+", backend)
    rows = [
        RowRequest(
            key=seed,
            prompt_ids=engine.encode_prompt("n"),
            params=GenerationParams(temperature=1.0, top_k=0, max_new_tokens=6, seed=seed),
            constraint=constraint,
        )
        for seed in range(8)
    ]
    for completion in run(engine, rows).values():
        assert re.fullmatch("[0-9]+", completion.text)
        assert completion.finish_reason in ("stop", "length")


def test_mixed_batch_rows_equal_their_solo_runs(engine, tiny_model):
    prompt_a, prompt_b = engine.encode_prompt("The capital of France is"), engine.encode_prompt("Hello")
    schema = json.dumps(SCHEMAS["flat"])
    rows = [
        RowRequest(
            key="json",
            prompt_ids=prompt_a,
            params=GenerationParams(max_new_tokens=30),
            constraint=Constraint(constraints.JSON_SCHEMA, schema),
        ),
        RowRequest(key="free", prompt_ids=prompt_b, params=GenerationParams(max_new_tokens=12)),
        RowRequest(
            key="date",
            prompt_ids=prompt_b,
            params=GenerationParams(max_new_tokens=30),
            constraint=Constraint(
                constraints.REGEX, constraints.normalize_regex(REGEXES["date"]), constraints.XGRAMMAR
            ),
        ),
    ]
    together = run(engine, rows)
    for row in rows:
        alone = run(engine, [row])
        assert together[row.key].tokens == alone[row.key].tokens
        assert together[row.key].finish_reason == alone[row.key].finish_reason
    assert together["free"].tokens == hf_greedy(tiny_model, prompt_b, 12)
    assert valid("json", SCHEMAS["flat"], together["json"].text) or together["json"].finish_reason == "length"
    assert re.fullmatch(REGEXES["date"], together["date"].text, re.ASCII)


def test_grammar_state_follows_rows_through_filter_and_concatenate(engine):
    date = Constraint(constraints.REGEX, constraints.normalize_regex(REGEXES["date"]), constraints.LLGUIDANCE)
    phone = Constraint(constraints.REGEX, constraints.normalize_regex(REGEXES["phone"]), constraints.OUTLINES)
    first = [
        RowRequest(
            key="short", prompt_ids=engine.encode_prompt("a"), params=GenerationParams(max_new_tokens=2)
        ),
        RowRequest(
            key="date",
            prompt_ids=engine.encode_prompt("b"),
            params=GenerationParams(max_new_tokens=30),
            constraint=date,
        ),
    ]
    later = [
        RowRequest(
            key="phone",
            prompt_ids=engine.encode_prompt("a longer prompt"),
            params=GenerationParams(max_new_tokens=30),
            constraint=phone,
        )
    ]
    completions: dict[Hashable, Completion] = {}
    engine.add(first)
    for _ in range(3):  # "short" leaves the batch: filter
        collect(engine.step(), completions)
    engine.add(later)  # concatenate
    while engine.has_work:
        collect(engine.step(), completions)
    alone = {row.key: run(engine, [row])[row.key].tokens for row in first + later}
    assert {key: c.tokens for key, c in completions.items()} == alone
    assert re.fullmatch(REGEXES["date"], completions["date"].text, re.ASCII)
    assert re.fullmatch(REGEXES["phone"], completions["phone"].text, re.ASCII)
