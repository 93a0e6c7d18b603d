"""Checks of a payload's constraint (`regex_string`, `json_schema`,
`constrained_decoding_backend`) before it is queued. A constraint is either
enforced exactly or refused: 400 for an unknown backend, a regex outside the
shared dialect, an invalid schema, a keyword the chosen backend would ignore
or enforce wrongly (the tables below, found by sampling through each backend's
masks and validating the results), or answers longer than max_new_tokens on a
backend that cannot finish them early (answer_bounds.py); 501 when the backend
is not installed.
Nothing here imports torch: outlines-core and llguidance are asked directly
where they can say more than the tables."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError

from api.answer_bounds import longest_json_answer, longest_regex_answer
from api.errors import InvalidConstraint, NotImplementedYet
from shared import constraints, defaults
from shared.constraints import InvalidRegex, UnknownBackend
from shared.payload import GenerateRequest

# Keywords that only annotate or hold definitions: no backend needs to enforce them.
ANNOTATIONS = frozenset(
    {
        "$schema",
        "$id",
        "$anchor",
        "$dynamicAnchor",
        "$recursiveAnchor",
        "$vocabulary",
        "$comment",
        "$defs",
        "definitions",
        "title",
        "description",
        "default",
        "examples",
        "deprecated",
        "readOnly",
        "writeOnly",
        "contentEncoding",
        "contentMediaType",
        "contentSchema",
    }
)

# Every JSON Schema keyword that constrains an instance (drafts 4 to 2020-12).
# Keys outside this set and ANNOTATIONS are not JSON Schema: validators ignore
# them, and so may we.
VALIDATION_KEYWORDS = frozenset(
    {
        "type",
        "enum",
        "const",
        "multipleOf",
        "maximum",
        "exclusiveMaximum",
        "minimum",
        "exclusiveMinimum",
        "maxLength",
        "minLength",
        "pattern",
        "format",
        "maxItems",
        "minItems",
        "uniqueItems",
        "maxContains",
        "minContains",
        "contains",
        "maxProperties",
        "minProperties",
        "required",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "properties",
        "patternProperties",
        "additionalProperties",
        "propertyNames",
        "items",
        "prefixItems",
        "additionalItems",
        "unevaluatedItems",
        "unevaluatedProperties",
        "allOf",
        "anyOf",
        "oneOf",
        "not",
        "if",
        "then",
        "else",
        "$ref",
        "$dynamicRef",
        "$recursiveRef",
    }
)

_COMMON = frozenset(
    {
        "type",
        "enum",
        "const",
        "properties",
        "required",
        "additionalProperties",
        "unevaluatedProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "pattern",
        "format",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "minProperties",
        "maxProperties",
    }
)

# Keywords each backend enforces (with the structural rules below). Measured:
# - outlines ignores numeric bounds, multipleOf, uniqueItems, contains,
#   dependentRequired, not, if/then/else and propertyNames, reads oneOf as
#   anyOf, and lets each schema node be read by ONE keyword (properties, then
#   allOf, anyOf, oneOf, prefixItems, enum, const, $ref, type; for strings
#   min/maxLength, then pattern, then format) — siblings are ignored.
# - xgrammar ignores uniqueItems, contains, dependentRequired, not and
#   if/then/else, reads allOf of several schemas and overlapping oneOf loosely,
#   and with minLength/maxLength lets raw control characters into strings
#   (invalid JSON).
# - llguidance refuses what it does not implement itself (uniqueItems,
#   contains, not, if/then/else, propertyNames, dependentRequired,
#   unevaluatedProperties, oneOf...): its own validator answers for it.
SUPPORTED: dict[str, frozenset[str]] = {
    constraints.OUTLINES: _COMMON | {"minLength", "maxLength"},
    constraints.XGRAMMAR: _COMMON
    | {
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "patternProperties",
        "propertyNames",
    },
    constraints.LLGUIDANCE: VALIDATION_KEYWORDS,
}

# String formats whose outputs were checked valid. Others are refused: e.g.
# outlines' and xgrammar's date patterns allow 2023-11-31, outlines' time and
# date-time patterns are wrong, xgrammar's ipv4 allows leading zeros.
FORMATS: dict[str, frozenset[str] | None] = {
    constraints.OUTLINES: frozenset({"uuid", "email"}),
    constraints.XGRAMMAR: frozenset({"uuid", "time"}),
    constraints.LLGUIDANCE: None,  # llguidance refuses the formats it does not implement
}

# Python modules that must import for a backend to run.
_BACKEND_MODULES = {
    constraints.OUTLINES: "outlines_core",
    constraints.XGRAMMAR: "xgrammar",
    constraints.LLGUIDANCE: "llguidance",
}

# outlines reads a schema node by the first of these keywords it holds.
_OUTLINES_DISPATCH = ("properties", "allOf", "anyOf", "oneOf", "prefixItems", "enum", "const", "$ref", "type")
_OUTLINES_SIBLINGS: dict[str, frozenset[str]] = {
    "properties": frozenset({"type", "required", "additionalProperties", "unevaluatedProperties"}),
    "allOf": frozenset(),
    "anyOf": frozenset(),
    "oneOf": frozenset(),
    "prefixItems": frozenset({"type", "items", "additionalItems", "unevaluatedItems"}),
    "enum": frozenset({"type"}),
    "const": frozenset({"type"}),
    "$ref": frozenset(),
}
_OUTLINES_BY_TYPE: dict[str, frozenset[str]] = {
    "string": frozenset({"minLength", "maxLength", "pattern", "format"}),
    "number": frozenset(),
    "integer": frozenset(),
    "boolean": frozenset(),
    "null": frozenset(),
    "array": frozenset({"items", "minItems", "maxItems"}),
    "object": frozenset({"additionalProperties", "minProperties", "maxProperties"}),
}

_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SUBSCHEMAS = (
    "additionalProperties",
    "unevaluatedProperties",
    "propertyNames",
    "contains",
    "additionalItems",
    "unevaluatedItems",
    "not",
    "if",
    "then",
    "else",
)


def check_constraint(payload: GenerateRequest) -> None:
    """Raise InvalidConstraint (400) or NotImplementedYet (501) unless the
    payload's constraint can be enforced exactly. regex_string wins over
    json_schema when both are set, so only it is checked then."""
    try:
        backend = constraints.resolve_backend(payload.constrained_decoding_backend)
    except UnknownBackend as exc:
        raise InvalidConstraint(str(exc)) from None
    if payload.regex_string is None and payload.json_schema is None:
        return
    if importlib.util.find_spec(_BACKEND_MODULES[backend]) is None:
        raise NotImplementedYet(
            f"the {backend} constrained decoding backend is not installed on this server; "
            f"choose one of: {', '.join(b for b in constraints.BACKENDS if _installed(b))}"
        )
    if payload.regex_string is not None:
        pattern = check_regex(payload.regex_string)
        if backend not in constraints.CLOSING_BACKENDS:
            _check_fits(longest_regex_answer(pattern), "regex_string", backend, payload.max_new_tokens)
    else:
        assert isinstance(payload.json_schema, dict)
        check_schema(payload.json_schema, backend)
        if backend not in constraints.CLOSING_BACKENDS:
            longest = longest_json_answer(constraints.normalize_schema(payload.json_schema), backend)
            _check_fits(longest, "json_schema", backend, payload.max_new_tokens)


def _check_fits(longest: int | None, key: str, backend: str, max_new_tokens: int) -> None:
    """InvalidConstraint unless every answer fits in max_new_tokens (for backends that
    cannot finish an answer early, an answer cut short would not parse)."""
    if longest is not None and longest <= max_new_tokens:
        return
    size = "have no length bound" if longest is None else f"may take up to {longest} tokens"
    raise_to = (
        f", or raise max_new_tokens to {longest}"
        if longest is not None and longest <= defaults.MAX_NEW_TOKENS_LIMIT
        else ""
    )
    closing = " or ".join(f'"{b}"' for b in constraints.CLOSING_BACKENDS)
    raise InvalidConstraint(
        f"the {backend} backend cannot finish an answer early, so max_new_tokens ({max_new_tokens}) "
        f"could cut it: this {key}'s answers {size}. Use constrained_decoding_backend {closing}, "
        f"which completes answers within max_new_tokens{raise_to}"
    )


def _installed(backend: str) -> bool:
    return importlib.util.find_spec(_BACKEND_MODULES[backend]) is not None


def check_regex(pattern: str) -> str:
    """The pattern in the shared dialect, or InvalidConstraint saying why not."""
    try:
        return constraints.normalize_regex(pattern)
    except InvalidRegex as exc:
        raise InvalidConstraint(f"regex_string: {exc}") from None


def check_schema(schema: dict[str, Any], backend: str) -> None:
    """InvalidConstraint unless `backend` enforces every keyword of `schema`."""
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(part) for part in exc.path)
        raise InvalidConstraint(
            f"json_schema is not a valid JSON Schema: {exc.message}" + (f" (at /{where})" if where else "")
        ) from None
    try:
        normalized = constraints.normalize_schema(schema)
    except InvalidRegex as exc:
        raise InvalidConstraint(f"json_schema: {exc}") from None

    for path, node in _nodes(normalized):
        _check_node(node, path, backend)
    if backend == constraints.OUTLINES:
        _check_outlines_refs(normalized)
        _ask_outlines(normalized)
    elif backend == constraints.LLGUIDANCE:
        _ask_llguidance(normalized)


def _refuse(keyword: str, path: str, backend: str, why: str = "") -> InvalidConstraint:
    others = [
        b
        for b in constraints.BACKENDS
        if b != backend and keyword in SUPPORTED[b] and keyword not in ("oneOf", "allOf", "format")
    ]
    hint = f"; constrained_decoding_backend {' or '.join(others)} enforces it" if others else ""
    reason = why or "which it would not enforce"
    return InvalidConstraint(
        f"json_schema uses `{keyword}` at {path or '/'}, {reason} with the {backend} backend{hint}"
    )


def _check_node(node: dict[str, Any], path: str, backend: str) -> None:
    for keyword, value in node.items():
        if keyword in ANNOTATIONS or keyword not in VALIDATION_KEYWORDS:
            continue
        if keyword not in SUPPORTED[backend]:
            raise _refuse(keyword, path, backend)
        if keyword == "format":
            allowed = FORMATS[backend]
            if allowed is not None and value not in allowed:
                raise _refuse(
                    "format",
                    path,
                    backend,
                    f"whose value {value!r} it does not enforce exactly (formats it does: "
                    f"{', '.join(sorted(allowed))})",
                )
        if keyword == "allOf" and backend != constraints.LLGUIDANCE and len(value) > 1:
            raise _refuse("allOf", path, backend, "over several schemas, which it does not enforce exactly")
        if keyword == "oneOf" and backend != constraints.LLGUIDANCE and not _disjoint_branches(value):
            raise _refuse(
                "oneOf",
                path,
                backend,
                "whose branches may overlap (it enforces oneOf as anyOf; make the branches "
                "distinguishable by type, const/enum or a required const property, or use anyOf)",
            )
    if backend == constraints.OUTLINES:
        _check_outlines_node(node, path)


def _check_outlines_node(node: dict[str, Any], path: str) -> None:
    """outlines reads each node by one keyword; refuse siblings it would ignore."""
    present = [k for k in node if k in VALIDATION_KEYWORDS]
    leader = next((k for k in _OUTLINES_DISPATCH if k in node), None)
    if leader is None:
        return
    if leader == "type":
        types = node["type"] if isinstance(node["type"], list) else [node["type"]]
        allowed = frozenset({"type"}).union(*(_OUTLINES_BY_TYPE.get(t, frozenset()) for t in types))
        if "string" in types:
            if "minLength" in node or "maxLength" in node:
                allowed -= {"pattern", "format"}
            elif "pattern" in node:
                allowed -= {"format"}
    else:
        allowed = _OUTLINES_SIBLINGS[leader] | {leader}
    for keyword in present:
        if keyword not in allowed:
            raise _refuse(
                keyword, path, "outlines", f"beside `{leader}`, which the outlines backend reads instead"
            )
    if leader == "properties":
        if "type" in node and node["type"] != "object":
            raise _refuse("type", path, "outlines", "not 'object' beside `properties`, which it would ignore")
        missing = [name for name in node.get("required", []) if name not in node["properties"]]
        if missing:
            raise _refuse(
                "required",
                path,
                "outlines",
                f"naming {', '.join(missing)} not listed in `properties`, which it would never generate",
            )
    if leader == "type" and "required" in node:
        raise _refuse("required", path, "outlines", "without `properties`, which it would not enforce")
    pattern = node.get("pattern")
    if isinstance(pattern, str) and "pattern" in allowed and not _json_string_safe(pattern):
        raise _refuse(
            "pattern",
            path,
            "outlines",
            "matching quotes, backslashes or control characters, which it would write into the JSON "
            "string unescaped",
        )


def _json_string_safe(pattern: str) -> bool:
    """Whether every character `pattern` can match may stand unescaped in a JSON string."""
    unsafe = [(0, 0x1F), (ord('"'), ord('"')), (ord("\\"), ord("\\"))]
    for negated, ranges in constraints.regex_chars(pattern.removeprefix("^").removesuffix("$")):
        for low, high in unsafe:
            covered = any(a <= low and high <= b for a, b in ranges)
            overlaps = any(a <= high and low <= b for a, b in ranges)
            if (negated and not covered) or (not negated and overlaps):
                return False
    return True


def _check_outlines_refs(schema: dict[str, Any]) -> None:
    """outlines unrolls $ref a few levels deep and then silently drops the
    property: refuse recursive references."""

    def refs(node: Any) -> Iterator[str]:
        for _, sub in _nodes(node):
            ref = sub.get("$ref")
            if isinstance(ref, str):
                yield ref

    def resolve(ref: str) -> Any:
        target: Any = schema
        for part in ref.removeprefix("#").strip("/").split("/"):
            if not part:
                continue
            if not isinstance(target, dict) or part not in target:
                raise InvalidConstraint(f"json_schema: cannot resolve $ref {ref!r}")
            target = target[part]
        return target

    def visit(ref: str, trail: tuple[str, ...]) -> None:
        if ref in trail:
            raise _refuse("$ref", ref, "outlines", "recursively, which it only unrolls a few levels")
        for inner in refs(resolve(ref)):
            visit(inner, (*trail, ref))

    for ref in set(refs(schema)):
        if not ref.startswith("#"):
            raise InvalidConstraint(f"json_schema: only local references (#/...) are supported, not {ref!r}")
        visit(ref, ())


def _ask_outlines(schema: dict[str, Any]) -> None:
    try:
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        return
    try:
        build_regex_from_schema(json.dumps(schema))
    except (ValueError, RuntimeError) as exc:
        raise InvalidConstraint(f"json_schema cannot be compiled by the outlines backend: {exc}") from None


def _ask_llguidance(schema: dict[str, Any]) -> None:
    try:
        from llguidance import LLMatcher
    except ImportError:
        return
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, overrides=constraints.LLGUIDANCE_JSON_OPTIONS)
    except ValueError as exc:
        raise InvalidConstraint(f"json_schema cannot be compiled by the llguidance backend: {exc}") from None
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidConstraint(f"json_schema cannot be compiled by the llguidance backend: {error}")


def _nodes(schema: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema object in `schema` with its JSON pointer."""
    if not isinstance(schema, dict):
        return
    yield path, schema
    for key in _SUBSCHEMA_MAPS:
        value = schema.get(key)
        if isinstance(value, dict):
            for name, sub in value.items():
                yield from _nodes(sub, f"{path}/{key}/{name}")
    for key in _SUBSCHEMA_LISTS:
        value = schema.get(key)
        if isinstance(value, list):
            for index, sub in enumerate(value):
                yield from _nodes(sub, f"{path}/{key}/{index}")
    for key in _SUBSCHEMAS:
        yield from _nodes(schema.get(key), f"{path}/{key}")
    items = schema.get("items")
    if isinstance(items, list):
        for index, sub in enumerate(items):
            yield from _nodes(sub, f"{path}/items/{index}")
    else:
        yield from _nodes(items, f"{path}/items")
    dependencies = schema.get("dependencies")
    if isinstance(dependencies, dict):
        for name, sub in dependencies.items():
            yield from _nodes(sub, f"{path}/dependencies/{name}")


# -- oneOf branches that cannot both match -----------------------------------

_TYPES = ("null", "boolean", "integer", "number", "string", "array", "object")


def _values(schema: Any) -> list[str] | None:
    """The instances a const/enum schema allows, as canonical JSON, else None."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return [json.dumps(schema["const"], sort_keys=True)]
    if isinstance(schema.get("enum"), list):
        return [json.dumps(value, sort_keys=True) for value in schema["enum"]]
    return None


def _types(schema: Any) -> set[str] | None:
    if not isinstance(schema, dict):
        return None
    declared = schema.get("type")
    if isinstance(declared, str):
        declared = [declared]
    if isinstance(declared, list):
        types = set(declared)
        if "number" in types:
            types.add("integer")
        return types
    values = _values(schema)
    if values is None:
        return None
    types = set()
    for text in values:
        value = json.loads(text)
        if value is None:
            types.add("null")
        elif isinstance(value, bool):
            types.add("boolean")
        elif isinstance(value, int | float):
            types.update({"number", "integer"})
        elif isinstance(value, str):
            types.add("string")
        elif isinstance(value, list):
            types.add("array")
        else:
            types.add("object")
    return types


def _disjoint(a: Any, b: Any) -> bool:
    values_a, values_b = _values(a), _values(b)
    if values_a is not None and values_b is not None and not set(values_a) & set(values_b):
        return True
    types_a, types_b = _types(a), _types(b)
    if types_a is not None and types_b is not None and not types_a & types_b:
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        props_a, props_b = a.get("properties") or {}, b.get("properties") or {}
        shared = set(a.get("required") or []) & set(b.get("required") or []) & set(props_a) & set(props_b)
        for name in shared:
            first, second = _values(props_a[name]), _values(props_b[name])
            if first is not None and second is not None and not set(first) & set(second):
                return True
    return False


def _disjoint_branches(branches: Any) -> bool:
    if not isinstance(branches, list):
        return False
    return all(_disjoint(a, b) for i, a in enumerate(branches) for b in branches[i + 1 :])
