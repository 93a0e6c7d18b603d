"""The declarations in shared/settings.py and how settings travel through environment variables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shared import defaults
from shared.settings import (
    ApiSettings,
    ProcessSettings,
    ServeSettings,
    WorkerSettings,
    declared,
    environment_of,
    from_environment,
)

ROOT = Path(__file__).resolve().parents[3]
SETTINGS_CLASSES = (ProcessSettings, ServeSettings, ApiSettings, WorkerSettings)


def other_value(one):
    """A valid value of a declared setting that is not its default."""
    if one.choices:
        return next(choice for choice in one.choices if choice != one.default)
    if one.repeatable:
        return ("a=/x/a", "b=/x/b")
    if one.kind is bool:
        return not one.default
    if one.kind in (int, float):
        return one.kind((one.default or one.minimum or 0) + 7)
    return f"{one.attribute}-value"


@pytest.mark.parametrize("settings_class", [ApiSettings, WorkerSettings])
def test_every_setting_comes_back_from_the_environment_it_is_written_to(settings_class):
    values = {one.attribute: other_value(one) for one in declared(settings_class)}
    environ = {
        name: text for name, text in environment_of(settings_class, values).items() if text is not None
    }
    assert len(environ) == len(values)
    assert from_environment(settings_class, environ) == settings_class(**values)


def test_unset_and_empty_variables_keep_the_defaults():
    settings = from_environment(WorkerSettings, {"MMSERVE_REDIS_URL": "redis://x", "MMSERVE_MODEL": ""})
    assert settings == WorkerSettings(redis_url="redis://x")
    assert settings.max_batch_size == defaults.DEFAULT_MAX_BATCH_SIZE and settings.model is None


def test_a_required_setting_left_unset_names_its_variable():
    with pytest.raises(ValueError, match="MMSERVE_REDIS_URL is not set"):
        from_environment(WorkerSettings, {})


@pytest.mark.parametrize(
    ("variable", "text", "message"),
    [
        ("MMSERVE_MAX_BATCH_SIZE", "eight", "must be an integer"),
        ("MMSERVE_MAX_BATCH_SIZE", "0", "must be >= 1"),
        ("MMSERVE_BATCH_DURATION_MILLIS", "-1", "must be >= 0"),
        ("MMSERVE_DEVICE", "tpu", "must be one of auto, cpu, cuda"),
        ("MMSERVE_LOG_LEVEL", "info", "must be one of DEBUG"),
        ("MMSERVE_DRAFT_TOKENS", "17", "must be <= 16"),
        ("MMSERVE_DRAFT_TOKENS", "0", "must be >= 1"),
        ("MMSERVE_SPECULATIVE", "sometimes", "must be one of auto, ngram, draft, off"),
    ],
)
def test_a_bad_worker_variable_is_refused_by_name(variable, text, message):
    with pytest.raises(ValueError, match=f"{variable} {message}"):
        from_environment(WorkerSettings, {"MMSERVE_REDIS_URL": "redis://x", variable: text})


@pytest.mark.parametrize(
    ("variable", "text", "message"),
    [
        ("MMSERVE_QUEUE_TIMEOUT_SECONDS", "soon", "must be a number"),
        ("MMSERVE_SSE_KEEPALIVE_SECONDS", "0", "must be > 0"),
        ("MMSERVE_ALLOW_REMOTE_IMAGES", "maybe", "must be true or false"),
    ],
)
def test_a_bad_api_variable_is_refused_by_name(variable, text, message):
    with pytest.raises(ValueError, match=f"{variable} {message}"):
        from_environment(ApiSettings, {"MMSERVE_REDIS_URL": "redis://x", variable: text})


def test_device_and_dtype_match_in_any_case_and_come_back_as_declared():
    settings = from_environment(
        WorkerSettings,
        {"MMSERVE_REDIS_URL": "redis://x", "MMSERVE_DEVICE": "CPU", "MMSERVE_DTYPE": "BFloat16"},
    )
    assert (settings.device, settings.dtype) == ("cpu", "bfloat16")


def test_switches_and_repeated_values_read_the_words_an_operator_writes():
    for text, expected in [("yes", True), ("ON", True), ("0", False), ("off", False)]:
        environ = {"MMSERVE_REDIS_URL": "redis://x", "MMSERVE_ALLOW_REMOTE_IMAGES": text}
        assert from_environment(ApiSettings, environ).allow_remote_images is expected
    environ = {"MMSERVE_REDIS_URL": "redis://x", "MMSERVE_LORA": "a=/x/a  b=/x/b"}
    assert from_environment(WorkerSettings, environ).lora == ("a=/x/a", "b=/x/b")


def test_a_field_may_be_named_apart_from_its_flag():
    by_attribute = {one.attribute: one for one in declared(ApiSettings)}
    assert by_attribute["first_event_timeout_seconds"].flag == "--queue-timeout-seconds"
    assert by_attribute["first_event_timeout_seconds"].env == "MMSERVE_QUEUE_TIMEOUT_SECONDS"
    assert by_attribute["keepalive_seconds"].env == "MMSERVE_SSE_KEEPALIVE_SECONDS"
    assert by_attribute["supervisor_id"].flag is None
    assert by_attribute["supervisor_id"].env == "MMSERVE_SUPERVISOR_ID"


def test_every_flag_has_one_variable_named_after_it_and_a_help_line():
    seen: dict[str, str] = {}
    for settings_class in SETTINGS_CLASSES:
        for one in declared(settings_class):
            assert one.help and "\n" not in one.help, one.attribute
            if one.flag is not None:
                assert one.env == "MMSERVE_" + one.flag[2:].replace("-", "_").upper()
            assert seen.setdefault(one.env, one.attribute) == one.attribute, one.env


def test_settings_import_nothing_but_the_standard_library_shared_and_pydantic():
    code = (
        "import sys, shared.settings, shared.supervision; "
        "print(' '.join(sorted(name for name in sys.modules if name.split('.')[0] in "
        "('click', 'flask', 'torch', 'api', 'worker', 'mmserve'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""
