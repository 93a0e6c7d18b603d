"""The longest answer a constraint allows, for the backends that cannot finish an
answer early: such a backend gets a constraint only if every answer it allows
fits in the request's max_new_tokens, so no answer is ever cut.

Lengths are bytes of UTF-8 text, an upper bound on tokens (every token a
grammar allows adds at least one byte). The bounds are safe, not tight: a
string character is counted as the longest JSON escape (12 bytes), optional
properties as present, separators as the backends' ", " and ": ". None means
unbounded.
"""

from __future__ import annotations

import json
import math
import re._constants as _sre  # Python's own regex parser measures a pattern's width
import re._parser as _sre_parse
from typing import Any

from shared import constraints

UTF8_MAX_BYTES = 4
ESCAPED_CHAR_MAX_BYTES = 12  # a character beyond U+FFFF written as two \uXXXX escapes
SEPARATOR_BYTES = 2  # ", " between items, ": " after a key
KNOWN_FORMAT_BYTES = {"uuid": 36}


def longest_regex_answer(pattern: str) -> int | None:
    """Bytes of the longest full match of `pattern` (in the shared dialect)."""
    width = _widest(pattern)
    return None if width is None else width * UTF8_MAX_BYTES


def longest_json_answer(schema: Any, backend: str) -> int | None:
    """Bytes of the longest JSON document `backend` would write for `schema`
    (already checked: every keyword in it is one the backend enforces)."""
    return _Bounds(schema, backend).of(schema, frozenset())


class _Bounds:
    def __init__(self, root: Any, backend: str):
        self.root = root
        # xgrammar (strict mode) allows no properties beyond those listed; llguidance
        # follows JSON Schema, where unlisted properties are allowed unless refused.
        self.extra_properties_by_default = backend != constraints.XGRAMMAR

    def of(self, node: Any, seen: frozenset[str]) -> int | None:
        if node is False:
            return 0
        if not isinstance(node, dict):
            return None
        bounds: list[int | None] = []
        if "const" in node:
            bounds.append(_dumped(node["const"]))
        if "enum" in node:
            bounds.append(_largest([_dumped(value) for value in node["enum"]]))
        for keyword in ("anyOf", "oneOf"):
            if keyword in node:
                bounds.append(_largest([self.of(branch, seen) for branch in node[keyword]]))
        bounds.extend(self.of(branch, seen) for branch in node.get("allOf", ()))
        ref = node.get("$ref")
        if isinstance(ref, str):
            bounds.append(None if ref in seen else self.of(self._resolve(ref), seen | {ref}))
        types = node.get("type", _implied_type(node))
        if types is not None:
            bounds.append(_largest([self._typed(t, node, seen) for t in _listed(types)]))
        known = [bound for bound in bounds if bound is not None]
        return min(known) if known else None  # every keyword holds, so the tightest bound does

    def _typed(self, kind: str, node: dict[str, Any], seen: frozenset[str]) -> int | None:
        if kind == "null":
            return len("null")
        if kind == "boolean":
            return len("false")
        if kind == "integer":
            return _integer(node)
        if kind == "string":
            return _string(node)
        if kind == "array":
            return self._array(node, seen)
        if kind == "object":
            return self._object(node, seen)
        return None  # numbers have no length bound

    def _array(self, node: dict[str, Any], seen: frozenset[str]) -> int | None:
        prefix = [self.of(item, seen) for item in node.get("prefixItems", ())]
        rest = self.of(node["items"], seen) if "items" in node else None
        count = node.get("maxItems")
        if node.get("items") is False:
            count = len(prefix) if count is None else min(count, len(prefix))
        if count is None:
            return None
        items = (prefix + [rest] * count)[:count]
        return _container(items)

    def _object(self, node: dict[str, Any], seen: frozenset[str]) -> int | None:
        extra = node.get("additionalProperties", node.get("unevaluatedProperties"))
        if node.get("patternProperties") or (
            extra is not False and (extra is not None or self.extra_properties_by_default)
        ):
            return None
        properties = node.get("properties", {})
        members = [
            None if (value := self.of(schema, seen)) is None else _dumped(name) + SEPARATOR_BYTES + value
            for name, schema in properties.items()
        ]
        return _container(members)

    def _resolve(self, ref: str) -> Any:
        target: Any = self.root
        for part in ref.removeprefix("#").strip("/").split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                return None
            target = target[part]
        return target


def _integer(node: dict[str, Any]) -> int | None:
    low = node.get("minimum", node.get("exclusiveMinimum"))
    high = node.get("maximum", node.get("exclusiveMaximum"))
    numbers = [v for v in (low, high) if isinstance(v, int | float) and not isinstance(v, bool)]
    if len(numbers) < 2:  # unbounded on a side (draft 4's boolean exclusive bounds are no bound)
        return None
    return max(len(str(math.floor(low))), len(str(math.ceil(high))))


def _string(node: dict[str, Any]) -> int | None:
    quotes = 2
    if isinstance(node.get("maxLength"), int):
        return quotes + node["maxLength"] * ESCAPED_CHAR_MAX_BYTES
    pattern = node.get("pattern")
    if isinstance(pattern, str) and pattern.startswith("^") and pattern.endswith("$"):
        width = _widest(pattern)
        return None if width is None else quotes + width * ESCAPED_CHAR_MAX_BYTES
    length = KNOWN_FORMAT_BYTES.get(node.get("format", ""))
    return None if length is None else quotes + length


def _widest(pattern: str) -> int | None:
    """Characters of the longest match of `pattern`; None if unbounded."""
    width = _sre_parse.parse(pattern).getwidth()[1]
    return None if width >= _sre.MAXREPEAT else width


def _implied_type(node: dict[str, Any]) -> str | None:
    if "properties" in node:
        return "object"
    if "items" in node or "prefixItems" in node:
        return "array"
    return None


def _container(members: list[int | None]) -> int | None:
    brackets = 2
    if any(member is None for member in members):
        return None
    return brackets + sum(members) + SEPARATOR_BYTES * max(len(members) - 1, 0)  # type: ignore[arg-type]


def _largest(bounds: list[int | None]) -> int | None:
    return None if not bounds or any(bound is None for bound in bounds) else max(bounds)  # type: ignore[type-var]


def _listed(types: Any) -> list[str]:
    return list(types) if isinstance(types, list) else [types]


def _dumped(value: Any) -> int:
    """Bytes of `value` as JSON, each non-ASCII character as its longest escape."""
    return len(json.dumps(value, ensure_ascii=True, separators=(", ", ": ")).encode())
