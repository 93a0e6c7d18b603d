"""The gunicorn entry point reads its settings from MMSERVE_* variables."""

import pytest

from api import wsgi
from shared import defaults


def test_settings_from_env_reads_every_variable():
    settings = wsgi.settings_from_env(
        {
            "MMSERVE_REDIS_URL": "redis://example:6379/2",
            "MMSERVE_PORT": "8000",
            "MMSERVE_MANAGEMENT_PORT": "8001",
            "MMSERVE_BODY_SIZE_LIMIT_BYTES": "1024",
            "MMSERVE_MAX_QUEUE_DEPTH": "50",
            "MMSERVE_API_KEY": "k",
        }
    )
    assert settings.redis_url == "redis://example:6379/2"
    assert (settings.port, settings.management_port) == (8000, 8001)
    assert settings.body_size_limit_bytes == 1024
    assert settings.max_queue_depth == 50
    assert settings.api_key == "k"


def test_unset_and_empty_variables_keep_the_defaults():
    settings = wsgi.settings_from_env({"MMSERVE_REDIS_URL": "redis://x", "MMSERVE_API_KEY": ""})
    assert settings.port == defaults.INFERENCE_PORT
    assert settings.management_port == defaults.MANAGEMENT_PORT
    assert settings.body_size_limit_bytes == defaults.DEFAULT_BODY_SIZE_LIMIT_BYTES
    assert settings.max_queue_depth is None
    assert settings.api_key is None


def test_a_missing_redis_url_is_explained():
    with pytest.raises(ValueError, match="MMSERVE_REDIS_URL"):
        wsgi.settings_from_env({})


def test_a_bad_number_names_its_variable():
    with pytest.raises(ValueError, match="MMSERVE_PORT must be an integer"):
        wsgi.settings_from_env({"MMSERVE_REDIS_URL": "redis://x", "MMSERVE_PORT": "http"})


def test_app_from_env_builds_an_app_without_touching_redis(monkeypatch):
    monkeypatch.setenv("MMSERVE_REDIS_URL", "redis://127.0.0.1:1/0")
    app = wsgi.app_from_env()
    assert app.test_client().get("/healthz").status_code == 200
