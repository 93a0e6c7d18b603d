"""docs/configuration.md and the CLI's options are both made from shared/settings.py."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from mmserve import cli, configuration
from shared.settings import ApiSettings, ProcessSettings, ServeSettings, WorkerSettings, declared

ROOT = Path(__file__).resolve().parents[3]
PAGE = ROOT / "docs" / "configuration.md"

COMMANDS = {
    "serve": (ProcessSettings, ServeSettings, ApiSettings, WorkerSettings),
    "api": (ProcessSettings, ApiSettings),
    "worker": (ProcessSettings, WorkerSettings),
}


def test_the_committed_page_is_what_the_declarations_write():
    assert PAGE.is_file(), f"docs/configuration.md is missing: run `{configuration.COMMAND}`"
    assert PAGE.read_text() == configuration.render(), (
        f"docs/configuration.md is stale: run `{configuration.COMMAND}` and commit the result"
    )


def test_the_page_names_every_flag_and_variable():
    page = configuration.render()
    for settings_class in (ProcessSettings, ServeSettings, ApiSettings, WorkerSettings):
        for one in declared(settings_class):
            assert f"`{one.env}`" in page
            if one.flag is not None:
                assert f"| `{one.flag}` |" in page
    assert "`PROMETHEUS_MULTIPROC_DIR`" in page


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_takes_exactly_the_flags_declared_for_it(command):
    declared_here = {
        one.flag: one for settings_class in COMMANDS[command] for one in declared(settings_class) if one.flag
    }
    options = {
        param.opts[0]: param for param in cli.main.commands[command].params if isinstance(param, click.Option)
    }
    assert options.keys() == declared_here.keys()
    for flag, one in declared_here.items():
        assert (options[flag].name, options[flag].envvar) == (one.attribute, one.env)
        assert options[flag].default == one.default
        assert options[flag].help == one.help
