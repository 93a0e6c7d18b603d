"""docs/configuration.md, written from the declarations in shared/settings.py:

    python -m mmserve.configuration > docs/configuration.md

tests/unit/mmserve/test_configuration.py fails while the committed page differs from what this writes."""

from __future__ import annotations

import re
import sys
from typing import Any

from shared.settings import (
    OTHER_ENVIRONMENT,
    ApiSettings,
    ProcessSettings,
    ServeSettings,
    Setting,
    WorkerSettings,
    declared,
)

COMMAND = "python -m mmserve.configuration > docs/configuration.md"

INTRODUCTION = f"""\
# Configuration

<!-- Written by `{COMMAND}` from shared/settings.py: change the declarations there, then run it again. -->

Every flag is also an environment variable, `MMSERVE_` and the flag's name in capitals with `_` for `-`
(`--max-batch-size` is `MMSERVE_MAX_BATCH_SIZE`). A flag on the command line wins over its variable; an
empty variable counts as unset. `mmserve serve` hands the API and worker settings on to the processes it
starts, and `POST /reader` may change some worker settings for the worker it starts.
"""

GROUPS = [
    ("Every command: `serve`, `api` and `worker`", ProcessSettings, None),
    ("`serve` only", ServeSettings, None),
    ("The API: `serve` and `api`", ApiSettings, ProcessSettings),
    ("Workers: `serve` and `worker`", WorkerSettings, ProcessSettings),
]


_ESCAPES = {"<": "&lt;", ">": "&gt;", "&": "&amp;", "|": r"\|"}


def _code(text: Any) -> str:
    return f"`{text}`"


def _prose(text: str) -> str:
    """Markdown for a help line: `<`, `>`, `&` and `|` escaped outside its code spans."""
    parts = text.split("`")
    for index in range(0, len(parts), 2):
        parts[index] = re.sub(r"[<>&|]", lambda match: _ESCAPES[match[0]], parts[index])
    return "`".join(parts)


def _values(one: Setting) -> str:
    if one.kind is bool:
        return "switch (variable: true/false)"
    if one.choices:
        return ", ".join(_code(choice) for choice in one.choices)
    if one.repeatable:
        return f"{_code(one.metavar or 'TEXT')}, repeatable (variable: space-separated)"
    if one.directory:
        return "existing folder" if one.must_exist else "folder"
    if one.kind in (int, float):
        kind = "integer" if one.kind is int else "number"
        bounds = []
        if one.minimum is not None:
            bounds.append(f"{'>' if one.above_minimum else '≥'} {one.minimum}")
        if one.maximum is not None:
            bounds.append(f"≤ {one.maximum}")
        return " ".join([kind, ", ".join(bounds)]) if bounds else kind
    return "text"


def _default(one: Setting) -> str:
    if one.default is None or one.default == ():
        return "unset"
    if one.default is False:
        return "off"
    return _code(one.default)


def _table(settings: list[Setting]) -> list[str]:
    lines = ["| Flag | Environment variable | Values | Default | What it does |", "|---|---|---|---|---|"]
    for one in settings:
        cells = [_code(one.flag), _code(one.env), _values(one), _default(one), _prose(one.help)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render() -> str:
    """The whole page."""
    lines = [INTRODUCTION]
    environment_only = []
    for title, settings_class, inherited in GROUPS:
        left_out = set() if inherited is None else {one.attribute for one in declared(inherited)}
        settings = [one for one in declared(settings_class) if one.attribute not in left_out]
        environment_only += [one for one in settings if one.flag is None]
        lines += [f"## {title}", "", *_table([one for one in settings if one.flag is not None]), ""]
    lines += ["## Environment variables without a flag", "", "| Variable | What it does |", "|---|---|"]
    lines += [f"| {_code(one.env)} | {_prose(one.help)} |" for one in environment_only]
    lines += [f"| {_code(one.name)} | {_prose(one.help)} |" for one in OTHER_ENVIRONMENT]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
