"""The longest answer of a constraint, and the 400 a backend that cannot finish
answers early gives when max_new_tokens could cut one."""

from __future__ import annotations

import json

import pytest

from api.answer_bounds import longest_json_answer, longest_regex_answer
from shared import constraints
from tests.support.api_fakes import add_reader, done, token

XGRAMMAR, LLGUIDANCE = constraints.XGRAMMAR, constraints.LLGUIDANCE


@pytest.fixture(autouse=True)
def _reader(connection):
    add_reader(connection)


@pytest.mark.parametrize(
    ("pattern", "longest"),
    [("abc", 12), ("[0-9]{4}", 16), ("(yes|no)", 12), ("a?b{0,3}", 16), ("a+", None), ("x*", None)],
)
def test_a_regex_is_bounded_by_its_widest_match(pattern, longest):
    assert longest_regex_answer(pattern) == longest


def _object(backend_closed: bool = True, **properties) -> dict:
    schema = {"type": "object", "properties": properties, "required": list(properties)}
    if backend_closed:
        schema["additionalProperties"] = False
    return schema


@pytest.mark.parametrize(
    ("schema", "instance"),
    [
        ({"type": "boolean"}, False),
        ({"type": "null"}, None),
        ({"enum": ["red", "green", "é"]}, "green"),
        ({"const": {"a": [1, 2]}}, {"a": [1, 2]}),
        ({"type": "integer", "minimum": -40, "maximum": 999}, -40),
        ({"type": "integer", "exclusiveMinimum": 0, "maximum": 12345}, 12345),
        ({"type": "string", "maxLength": 3}, "\U0001f600" * 3),
        ({"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}, "AB-123"),
        ({"type": "string", "format": "uuid"}, "123e4567-e89b-12d3-a456-426614174000"),
        ({"type": "array", "items": {"type": "boolean"}, "maxItems": 3}, [False, False, False]),
        (
            {"type": "array", "prefixItems": [{"type": "boolean"}, {"type": "null"}], "items": False},
            [True, None],
        ),
        (_object(ok={"type": "boolean"}, n={"enum": [1, 22]}), {"ok": False, "n": 22}),
        ({"anyOf": [{"type": "boolean"}, {"enum": ["long value"]}]}, "long value"),
        ({"type": ["boolean", "null"]}, False),
    ],
)
@pytest.mark.parametrize("backend", [XGRAMMAR, LLGUIDANCE])
def test_a_bound_is_never_below_an_answer(schema, instance, backend):
    longest = longest_json_answer(schema, backend)
    assert longest is not None
    written = json.dumps(instance, ensure_ascii=True, separators=(", ", ": "))
    assert len(written.encode()) <= longest


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string"},
        {"type": "number", "minimum": 0, "maximum": 1},
        {"type": "integer", "minimum": 0},
        {"type": "integer", "exclusiveMinimum": True, "maximum": 9},
        {"type": "array", "items": {"type": "boolean"}},
        {"type": "array", "items": {"type": "string"}, "maxItems": 2},
        {"type": "string", "pattern": "[a-z]{3}"},  # unanchored: anything around it
        {"type": "string", "format": "email"},
        {"type": "object", "properties": {"a": {"type": "boolean"}}, "patternProperties": {"x": {}}},
        {
            "$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}, "maxItems": 2}},
            "$ref": "#/$defs/n",
        },
        {},
        True,
    ],
)
def test_unbounded_schemas_have_no_bound(schema):
    assert longest_json_answer(schema, XGRAMMAR) is None
    assert longest_json_answer(schema, LLGUIDANCE) is None


def test_unlisted_properties_bound_an_object_only_where_the_backend_forbids_them():
    schema = _object(backend_closed=False, ok={"type": "boolean"})
    assert longest_json_answer(schema, XGRAMMAR) == len('{"ok": false}')  # strict mode
    assert longest_json_answer(schema, LLGUIDANCE) is None


def test_every_keyword_holds_so_the_tightest_bound_counts():
    schema = {"type": "string", "maxLength": 50, "enum": ["a", "bb"]}
    assert longest_json_answer(schema, LLGUIDANCE) == len('"bb"')
    both = {"allOf": [{"type": "string"}, {"enum": ["abc"]}]}
    assert longest_json_answer(both, LLGUIDANCE) == len('"abc"')


# -- at the API ------------------------------------------------------------------


def _refusal(client, body: dict) -> str:
    response = client.post("/generate", json={"text": "hi", **body})
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.get_json()["error_type"] == "invalid_constraint"
    return response.get_json()["error"]


@pytest.mark.parametrize("backend", [XGRAMMAR, LLGUIDANCE])
def test_an_unbounded_constraint_on_a_backend_that_cannot_close_is_400_naming_outlines(client, backend):
    schema = _object(ok={"type": "boolean"}, note={"type": ["string", "null"]})
    error = _refusal(client, {"json_schema": schema, "constrained_decoding_backend": backend})
    assert backend in error and "no length bound" in error and '"outlines"' in error
    error = _refusal(client, {"regex_string": "[a-z]+", "constrained_decoding_backend": backend})
    assert "regex_string" in error and '"outlines"' in error


def test_a_bounded_constraint_over_the_budget_names_the_budget_that_fits(client):
    body = {"regex_string": "[0-9]{10}", "constrained_decoding_backend": XGRAMMAR, "max_new_tokens": 20}
    error = _refusal(client, body)
    assert "may take up to 40 tokens" in error and "raise max_new_tokens to 40" in error


def test_outlines_takes_any_budget_and_a_bounded_constraint_within_it_passes(client, worker):
    for backend, pattern in [("outlines", "[0-9]+"), (XGRAMMAR, "[0-9]{4}")]:
        body = {
            "text": "n",
            "regex_string": pattern,
            "constrained_decoding_backend": backend,
            "max_new_tokens": 16,
        }
        worker.serve(lambda job: [token(0, 0, "1234"), done(0, 4, "stop")])
        response = client.post("/generate", json=body)
        assert response.status_code == 200, response.get_data(as_text=True)
    worker.join()
    assert [job.request.constrained_decoding_backend for job in worker.jobs] == ["outlines", XGRAMMAR]
