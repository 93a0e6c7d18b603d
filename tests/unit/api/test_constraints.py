"""regex_string / json_schema / constrained_decoding_backend at the API: every
constraint that cannot be enforced exactly is answered 400 naming why, before
anything is queued; one that can goes to the worker as sent."""

from __future__ import annotations

import pytest

from api import constraints as constraints_api
from api.constraints import check_schema
from shared import constraints
from tests.support.api_fakes import add_reader, done, token

ROUTES = ["/generate", "/generate_stream"]
OBJECT_WITH = lambda **keywords: {  # noqa: E731
    "type": "object",
    "properties": {"x": keywords},
    "required": ["x"],
}


@pytest.fixture(autouse=True)
def _reader(connection):
    add_reader(connection)


def constraint_error(client, body, route="/generate"):
    response = client.post(route, json={"text": "hi", **body})
    assert response.status_code == 400, response.get_data(as_text=True)
    payload = response.get_json()
    assert payload["error_type"] == "invalid_constraint"
    return payload["error"]


@pytest.mark.parametrize("route", ROUTES)
def test_unknown_backend_is_400_listing_the_valid_ones(client, route):
    error = constraint_error(client, {"regex_string": "a+", "constrained_decoding_backend": "regexp"}, route)
    assert "'regexp'" in error
    assert all(backend in error for backend in constraints.BACKENDS)


def test_unknown_backend_is_400_even_without_a_constraint(client):
    assert "outlines" in constraint_error(client, {"constrained_decoding_backend": "nope"})


@pytest.mark.parametrize(
    ("pattern", "named"),
    [
        ("[a-", "invalid regex"),
        ("(ab", "invalid regex"),
        ("a(?=b)", "lookahead"),
        ("(a)\\1", "backreferences"),
        ("a\\bb", "anchors"),
        ("a*+", "possessive"),
        ("", "empty"),
        ("[\\Da]", "inside a character class"),
    ],
)
def test_invalid_or_unsupported_regex_is_400(client, pattern, named):
    assert named in constraint_error(client, {"regex_string": pattern})


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "objekt"},
        {"type": "object", "properties": {"a": {"type": "integer", "minimum": "five"}}},
        {"type": "object", "required": "a"},
    ],
)
def test_invalid_json_schema_is_400(client, schema):
    assert "not a valid JSON Schema" in constraint_error(client, {"json_schema": schema})


def test_a_schema_given_as_a_string_is_checked_too(client):
    error = constraint_error(client, {"json_schema": '{"type": "integer", "minimum": 3}'})
    assert "`minimum`" in error


@pytest.mark.parametrize(
    ("backend", "schema", "keyword"),
    [
        # outlines ignores numeric bounds, uniqueItems, contains, not, if/then...
        ("outlines", OBJECT_WITH(type="integer", minimum=5), "minimum"),
        ("outlines", OBJECT_WITH(type="number", maximum=5), "maximum"),
        ("outlines", OBJECT_WITH(type="integer", multipleOf=3), "multipleOf"),
        ("outlines", OBJECT_WITH(type="array", uniqueItems=True), "uniqueItems"),
        ("outlines", OBJECT_WITH(type="array", contains={"const": 1}), "contains"),
        ("outlines", OBJECT_WITH(type="integer", **{"not": {"const": 0}}), "not"),
        ("outlines", OBJECT_WITH(type="integer", **{"if": {"minimum": 0}, "then": {}}), "if"),
        ("outlines", OBJECT_WITH(type="object", propertyNames={"pattern": "^a"}), "propertyNames"),
        ("outlines", OBJECT_WITH(type="string", format="date"), "format"),
        ("outlines", OBJECT_WITH(type="string", format="date-time"), "format"),
        # ...reads one keyword per node...
        ("outlines", OBJECT_WITH(type="string", maxLength=3, pattern="^[a-z]+$"), "pattern"),
        ("outlines", OBJECT_WITH(type="string", pattern="^[a-z]+$", format="email"), "format"),
        ("outlines", {"type": "object", "properties": {"a": {}}, "anyOf": [{}]}, "anyOf"),
        ("outlines", {"type": "object", "properties": {"a": {}}, "required": ["b"]}, "required"),
        # ...writes patterns into JSON strings unescaped, unrolls recursion only so far
        ("outlines", OBJECT_WITH(type="string", pattern="^.{3}$"), "pattern"),
        ("outlines", OBJECT_WITH(type="string", pattern="^[^a]+$"), "pattern"),
        (
            "outlines",
            {
                "$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}},
                "$ref": "#/$defs/n",
            },
            "$ref",
        ),
        # xgrammar ignores uniqueItems, not, if/then, dependentRequired; breaks strings with length bounds
        ("xgrammar", OBJECT_WITH(type="array", uniqueItems=True), "uniqueItems"),
        ("xgrammar", OBJECT_WITH(type="integer", **{"not": {"const": 0}}), "not"),
        ("xgrammar", OBJECT_WITH(type="string", maxLength=3), "maxLength"),
        ("xgrammar", OBJECT_WITH(type="string", minLength=3), "minLength"),
        ("xgrammar", {"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
        ("xgrammar", OBJECT_WITH(type="string", format="date"), "format"),
        ("xgrammar", OBJECT_WITH(type="string", format="ipv4"), "format"),
        ("xgrammar", OBJECT_WITH(allOf=[{"type": "integer"}, {"minimum": 3}]), "allOf"),
        # overlapping oneOf branches are read as anyOf
        ("outlines", OBJECT_WITH(oneOf=[{"type": "integer"}, {"type": "number"}]), "oneOf"),
        ("xgrammar", OBJECT_WITH(oneOf=[{"type": "integer"}, {"type": "number"}]), "oneOf"),
        # llguidance refuses what it does not implement, naming it
        ("llguidance", OBJECT_WITH(type="array", uniqueItems=True), "uniqueItems"),
        ("llguidance", OBJECT_WITH(type="integer", **{"not": {"const": 0}}), "not"),
        ("llguidance", OBJECT_WITH(oneOf=[{"type": "integer"}, {"type": "number"}]), "oneOf"),
    ],
)
def test_keywords_a_backend_would_not_enforce_are_400_naming_them(client, backend, schema, keyword):
    error = constraint_error(client, {"json_schema": schema, "constrained_decoding_backend": backend})
    assert keyword in error
    assert backend in error


def test_the_message_names_a_backend_that_enforces_the_keyword(client):
    error = constraint_error(client, {"json_schema": OBJECT_WITH(type="integer", minimum=5)})
    assert "xgrammar" in error


def test_backend_errors_surface_as_400(client):
    # outlines cannot read additionalProperties: false without properties
    schema = {"type": "object", "additionalProperties": False}
    assert "outlines" in constraint_error(client, {"json_schema": schema})


@pytest.mark.parametrize(
    ("backend", "schema"),
    [
        ("outlines", OBJECT_WITH(type="string", maxLength=5)),
        ("outlines", OBJECT_WITH(type="string", pattern="^[A-Z]{2}-[0-9]{3}$")),
        ("outlines", OBJECT_WITH(type="string", format="uuid")),
        ("outlines", OBJECT_WITH(oneOf=[{"type": "integer"}, {"type": "string"}])),
        (
            "outlines",
            OBJECT_WITH(
                oneOf=[
                    {"type": "object", "properties": {"kind": {"const": "a"}}, "required": ["kind"]},
                    {"type": "object", "properties": {"kind": {"const": "b"}}, "required": ["kind"]},
                ]
            ),
        ),
        ("xgrammar", OBJECT_WITH(type="integer", minimum=1, maximum=9, multipleOf=3)),
        ("xgrammar", OBJECT_WITH(type="string", pattern="^.{3}$")),
        ("llguidance", OBJECT_WITH(type="string", maxLength=12, format="date")),
        ("llguidance", OBJECT_WITH(oneOf=[{"type": "integer"}, {"type": "string"}])),
        ("llguidance", OBJECT_WITH(type="number", exclusiveMinimum=0)),
    ],
)
def test_schemas_a_backend_enforces_pass(backend, schema):
    check_schema(schema, backend)


def test_annotations_and_unknown_keywords_are_fine():
    schema = {"title": "T", "description": "d", "x-vendor": 1, **OBJECT_WITH(type="integer", default=3)}
    for backend in constraints.BACKENDS:
        check_schema(schema, backend)


def test_a_valid_constraint_is_queued_as_sent(client, worker):
    worker.serve(lambda job: [token(0, 0, "2024-01-02"), done(0, 5, "stop")])
    response = client.post(
        "/generate",
        json={
            "text": "When?",
            "regex_string": r"\d{4}-\d{2}-\d{2}",
            "json_schema": {"type": "integer", "minimum": 1},  # regex wins: not checked
            "constrained_decoding_backend": "llguidance",
            "return_metadata": True,
        },
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["text"] == "2024-01-02"
    assert response.get_json()["metadata"]["finish_reason"] == "stop"
    worker.join()
    request = worker.jobs[0].request
    assert request.regex_string == r"\d{4}-\d{2}-\d{2}"
    assert request.constrained_decoding_backend == "llguidance"


def test_constraint_errors_come_before_routing(client):
    # An unknown group would be a 404; the constraint is checked first.
    error = constraint_error(client, {"regex_string": "(", "consumer_group": "nope"})
    assert "invalid regex" in error


def test_a_backend_that_is_not_installed_is_501(client, monkeypatch):
    monkeypatch.setitem(constraints_api._BACKEND_MODULES, "xgrammar", "not_a_module_mmserve_knows")
    response = client.post(
        "/generate", json={"text": "hi", "regex_string": "a+", "constrained_decoding_backend": "xgrammar"}
    )
    assert response.status_code == 501
    assert response.get_json()["error_type"] == "not_implemented"
    assert "xgrammar" in response.get_json()["error"] and "outlines" in response.get_json()["error"]
