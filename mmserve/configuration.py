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
    lines += ["", *_takeoff_section()]
    return "\n".join(lines) + "\n"


TAKEOFF_INTRODUCTION = """\
## A Takeoff configuration

`mmserve serve --config config.yaml` runs a Takeoff manifest: `takeoff.server_config` sets the API's
ports and limits (where their flags are left at their defaults: a flag given wins), and each reader of
`takeoff.readers_config` starts `--workers` worker processes (1 by default) of its consumer group,
sharing the machine's threads. Without `--config`, `TAKEOFF_<KEY>` environment variables
(`TAKEOFF_MODEL_NAME`, `TAKEOFF_CONSUMER_GROUP`, `TAKEOFF_PORT`, ...) make a manifest of one reader, so a
compose file written for Takeoff runs by changing the image. `POST /reader` on the management port
takes the same reader keys.

```yaml
takeoff:
  server_config:
    port: 3000
    management_port: 3001
  readers_config:
    chat:
      model_name: HuggingFaceTB/SmolLM2-135M-Instruct
      device: cpu
      consumer_group: primary
      max_batch_size: 8
```

Keys that mean nothing here are named in one warning line when `serve` starts; an unknown key, a reader
without `model_name`, a key given twice or two ports that are one stop `serve` with a message naming
them. Embedding and classification readers (Takeoff's `EMBEDDING` and `CLASSIFICATION` models) are not
supported yet: a worker refuses an encoder model when it starts."""


def _takeoff_section() -> list[str]:
    from mmserve.takeoff_config import IGNORED_SERVER_KEYS, SERVER_SETTINGS, ServerConfig
    from shared.supervision import IGNORED_READER_KEYS, ReaderSpec

    flags = {one.attribute: one.flag for one in declared(ApiSettings)}
    lines = [TAKEOFF_INTRODUCTION, "", "| Key | What mmserve does with it |", "|---|---|"]
    for key in ServerConfig.model_fields:
        done = f"sets {_code(flags[SERVER_SETTINGS[key]])}" if key in SERVER_SETTINGS else "ignored"
        assert key in SERVER_SETTINGS or key in IGNORED_SERVER_KEYS
        lines.append(f"| {_code('server_config.' + key)} | {done} |")
    for key, field in ReaderSpec.model_fields.items():
        done = "ignored" if key in IGNORED_READER_KEYS else _prose(field.description or "")
        lines.append(f"| {_code('readers_config.<name>.' + key)} | {done} |")
    return lines


if __name__ == "__main__":
    sys.stdout.write(render())
