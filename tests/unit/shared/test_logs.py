from __future__ import annotations

import json
import logging

import pytest

from shared import logs


@pytest.fixture(autouse=True)
def _restore_root_logger():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_format_writes_one_object_per_line(capsys):
    logs.configure("INFO", "json")
    logging.getLogger("mmserve.test").info("request %s done", "abc")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("mmserve.test").exception("failed")
    lines = capsys.readouterr().err.strip().splitlines()
    first, second = (json.loads(line) for line in lines)
    assert (
        first["message"] == "request abc done"
        and first["level"] == "INFO"
        and first["logger"] == "mmserve.test"
    )
    assert "ValueError: boom" in second["exception"]


def test_text_format_and_levels(capsys):
    logs.configure("WARNING", "text")
    logging.getLogger("x").info("hidden")
    logging.getLogger("x").warning("shown")
    err = capsys.readouterr().err
    assert "shown" in err and "hidden" not in err


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="json"):
        logs.configure("INFO", "xml")
