"""Constrained decoding, the facts both sides share: which backends exist,
which one is the default, and how a payload names its constraint."""

from __future__ import annotations

import re
import re._constants as _sre  # Python's own regex parser gives the parse tree
import re._parser as _sre_parse
from typing import Any

OUTLINES = "outlines"
XGRAMMAR = "xgrammar"
LLGUIDANCE = "llguidance"

BACKENDS: tuple[str, ...] = (OUTLINES, XGRAMMAR, LLGUIDANCE)
DEFAULT_BACKEND = OUTLINES

REGEX = "regex"
JSON_SCHEMA = "json_schema"

# Backends that finish an answer early when max_new_tokens would cut it (their
# grammars are token automata whose shortest completions the worker knows). The
# others get only constraints whose every answer fits in max_new_tokens.
CLOSING_BACKENDS: tuple[str, ...] = (OUTLINES,)


class UnknownBackend(ValueError):
    """A `constrained_decoding_backend` this server does not have."""


def resolve_backend(name: str | None) -> str:
    """The backend a payload asks for (the default when unset); UnknownBackend
    naming the valid ones otherwise."""
    if name is None:
        return DEFAULT_BACKEND
    if name not in BACKENDS:
        raise UnknownBackend(
            f"constrained_decoding_backend {name!r} is not one of: {', '.join(BACKENDS)} "
            f"(default {DEFAULT_BACKEND})"
        )
    return name


# -- the regex dialect ----------------------------------------------------------
#
# The three backends read regexes differently (outlines-core and llguidance
# use Rust's regex syntax with Unicode \d and \w, xgrammar an ECMAScript-like
# subset without inline flags or named groups). So a pattern is read once
# with Python's `re` parser and written back in the small syntax all three
# agree on: \d, \w and \s become their ASCII classes (what re.ASCII means),
# case-insensitive letters become classes, groups become non-capturing, and
# features no backend can enforce are refused with a message naming them.

_SPACE = " \t\n\r\f\v"
_DIGITS = [(ord("0"), ord("9"))]
_WORD = [(ord("0"), ord("9")), (ord("A"), ord("Z")), (ord("_"), ord("_")), (ord("a"), ord("z"))]
_META = set("\\.^$|?*+()[]{}/")
_CLASS_META = set("\\[]^-")
_MAX_CHAR = 0x10FFFF


class InvalidRegex(ValueError):
    """A regex this server cannot enforce; the message says why."""


def normalize_regex(pattern: str, *, keep_anchors: bool = False) -> str:
    """`pattern` (Python `re` syntax, always matched in full) in the dialect
    every backend reads the same way. With `keep_anchors` a leading ^ and a
    trailing $ are kept (JSON Schema `pattern` searches unless anchored);
    otherwise they are dropped, since regex_string always matches in full.
    Raises InvalidRegex."""
    if not pattern:
        raise InvalidRegex("the regex is empty")
    try:
        parsed = _sre_parse.parse(pattern)
    except re.error as exc:
        raise InvalidRegex(f"invalid regex: {exc}") from None
    flags = parsed.state.flags
    if flags & re.MULTILINE:
        raise InvalidRegex("the multiline flag (?m) is not supported")
    items = list(parsed)
    head = (bool(items) and items[0] == (_sre.AT, _sre.AT_BEGINNING)) or items[:1] == [
        (_sre.AT, _sre.AT_BEGINNING_STRING)
    ]
    if head:
        items = items[1:]
    tail = bool(items) and items[-1][0] == _sre.AT and items[-1][1] in (_sre.AT_END, _sre.AT_END_STRING)
    if tail:
        items = items[:-1]
    body = _Writer(flags).sequence(items)
    if keep_anchors:
        return ("^" if head else "") + body + ("$" if tail else "")
    if not body:
        raise InvalidRegex("the regex matches only the empty string")
    return body


def regex_chars(pattern: str) -> list[tuple[bool, list[tuple[int, int]]]]:
    """Every character class a normalised pattern can match, as (negated,
    ranges) pairs: what a caller needs to know which characters may appear."""
    found: list[tuple[bool, list[tuple[int, int]]]] = []

    def walk(items: Any) -> None:
        for op, av in items:
            if op == _sre.LITERAL:
                found.append((False, [(av, av)]))
            elif op == _sre.NOT_LITERAL:
                found.append((True, [(av, av)]))
            elif op == _sre.ANY:
                found.append((True, [(ord("\n"), ord("\n"))]))
            elif op == _sre.IN:
                negated = any(o == _sre.NEGATE for o, _ in av)
                ranges = [
                    (v, v) if o == _sre.LITERAL else v for o, v in av if o in (_sre.LITERAL, _sre.RANGE)
                ]
                found.append((negated, ranges))
            elif op == _sre.BRANCH:
                for branch in av[1]:
                    walk(branch)
            elif op == _sre.SUBPATTERN:
                walk(av[3])
            elif op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT):
                walk(av[2])

    walk(_sre_parse.parse(pattern))
    return found


class _Writer:
    def __init__(self, flags: int):
        self.flags = flags

    def sequence(self, items: Any, flags: int | None = None) -> str:
        saved = self.flags
        if flags is not None:
            self.flags = flags
        try:
            return "".join(self.item(op, av) for op, av in items)
        finally:
            self.flags = saved

    def item(self, op: Any, av: Any) -> str:
        if op == _sre.LITERAL:
            return self.literal(av)
        if op == _sre.NOT_LITERAL:
            return self.char_class(True, self._cased([(av, av)]))
        if op == _sre.ANY:
            return "(?:[^\\n]|\\n)" if self.flags & re.DOTALL else "[^\\n]"
        if op == _sre.IN:
            return self.in_class(av)
        if op == _sre.CATEGORY:
            negated, ranges = _category(av)
            return self.char_class(negated, ranges)
        if op == _sre.BRANCH:
            return "(?:" + "|".join(self.sequence(branch) for branch in av[1]) + ")"
        if op == _sre.SUBPATTERN:
            _group, add_flags, del_flags, items = av
            return "(?:" + self.sequence(items, (self.flags | add_flags) & ~del_flags) + ")"
        if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT):
            low, high, items = av
            inner = self.sequence(items)
            if not (len(items) == 1 and items[0][0] in (_sre.LITERAL, _sre.IN, _sre.CATEGORY, _sre.ANY)):
                inner = "(?:" + inner + ")"
            if high == _sre.MAXREPEAT:
                suffix = {0: "*", 1: "+"}.get(low, f"{{{low},}}")
            elif (low, high) == (0, 1):
                suffix = "?"
            elif low == high:
                suffix = f"{{{low}}}"
            else:
                suffix = f"{{{low},{high}}}"
            return inner + suffix
        if op == _sre.AT:
            raise InvalidRegex(
                "anchors and word boundaries (^, $, \\b, \\B, \\A, \\Z) are only allowed at the very start "
                "or end: the whole output always matches the regex"
            )
        names = {
            _sre.ASSERT: "lookahead/lookbehind",
            _sre.ASSERT_NOT: "negative lookahead/lookbehind",
            _sre.GROUPREF: "backreferences",
            _sre.GROUPREF_EXISTS: "conditional groups",
            _sre.ATOMIC_GROUP: "atomic groups",
            _sre.POSSESSIVE_REPEAT: "possessive quantifiers",
        }
        raise InvalidRegex(f"{names.get(op, str(op))} are not supported in constrained decoding")

    def literal(self, code: int) -> str:
        cased = self._cased([(code, code)])
        if len(cased) > 1:
            return self.char_class(False, cased)
        return _escape(code, in_class=False)

    def in_class(self, items: Any) -> str:
        if len(items) == 1 and items[0][0] == _sre.CATEGORY:  # \D, \W, \S outside a class
            negated, ranges = _category(items[0][1])
            return self.char_class(negated, self._cased(ranges))
        negated = False
        ranges = []
        for op, av in items:
            if op == _sre.NEGATE:
                negated = True
            elif op == _sre.LITERAL:
                ranges.append((av, av))
            elif op == _sre.RANGE:
                ranges.append(av)
            elif op == _sre.CATEGORY:
                category_negated, category_ranges = _category(av)
                if category_negated:
                    raise InvalidRegex("\\D, \\W and \\S are not supported inside a character class")
                ranges.extend(category_ranges)
            else:
                raise InvalidRegex(f"unsupported item {op} in a character class")
        return self.char_class(negated, self._cased(ranges))

    def char_class(self, negated: bool, ranges: list[tuple[int, int]]) -> str:
        parts = []
        for low, high in _merge(ranges):
            if low == high:
                parts.append(_escape(low, in_class=True))
            else:
                parts.append(_escape(low, in_class=True) + "-" + _escape(high, in_class=True))
        return "[" + ("^" if negated else "") + "".join(parts) + "]"

    def _cased(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """With IGNORECASE, the other case of every ASCII letter too."""
        if not self.flags & re.IGNORECASE:
            return ranges
        extra = []
        for low, high in ranges:
            for first, last, shift in ((ord("a"), ord("z"), -32), (ord("A"), ord("Z"), 32)):
                start, end = max(low, first), min(high, last)
                if start <= end:
                    extra.append((start + shift, end + shift))
        return ranges + extra


def _category(code: Any) -> tuple[bool, list[tuple[int, int]]]:
    table = {
        _sre.CATEGORY_DIGIT: (False, _DIGITS),
        _sre.CATEGORY_NOT_DIGIT: (True, _DIGITS),
        _sre.CATEGORY_WORD: (False, _WORD),
        _sre.CATEGORY_NOT_WORD: (True, _WORD),
        _sre.CATEGORY_SPACE: (False, [(ord(c), ord(c)) for c in _SPACE]),
        _sre.CATEGORY_NOT_SPACE: (True, [(ord(c), ord(c)) for c in _SPACE]),
    }
    if code not in table:
        raise InvalidRegex(f"unsupported character category {code}")
    return table[code]


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


def _escape(code: int, *, in_class: bool) -> str:
    char = chr(code)
    if code < 0x20 or code == 0x7F or (in_class and char in "&~"):  # && and ~~ are set operations in Rust
        return f"\\x{code:02x}"
    if char in (_CLASS_META if in_class else _META):
        return "\\" + char
    if 0x80 <= code <= 0xFFFF and not char.isprintable():
        return f"\\u{code:04x}"
    return char


# llguidance's JSON layout, the same for every row (the API validates with it too):
# compact separators, no free whitespace a weak model could repeat forever.
LLGUIDANCE_JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


def normalize_schema(schema: Any) -> Any:
    """A copy of `schema` whose every string `pattern` is in the shared regex
    dialect (anchors kept: JSON Schema patterns search unless anchored).
    Raises InvalidRegex naming the pattern's place."""

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, list):
            return [walk(item, f"{path}/{index}") for index, item in enumerate(node)]
        if not isinstance(node, dict):
            return node
        result = {}
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                try:
                    result[key] = normalize_regex(value, keep_anchors=True)
                except InvalidRegex as exc:
                    raise InvalidRegex(f"pattern at {path or '/'}: {exc}") from None
            elif key in ("enum", "const", "default", "examples"):
                result[key] = value  # instances, not schemas
            else:
                result[key] = walk(value, f"{path}/{key}")
        return result

    return walk(schema, "")
