from __future__ import annotations

from click.testing import CliRunner

from mmserve import cli
from worker import main as worker_main


def test_worker_flags_come_from_mmserve_environment_variables(monkeypatch):
    seen = {}
    monkeypatch.setattr(worker_main, "run_worker", lambda settings: seen.setdefault("settings", settings))
    result = CliRunner().invoke(
        cli.main,
        ["worker", "--max-batch-size", "3"],
        env={
            "MMSERVE_REDIS_URL": "redis://example:6379/2",
            "MMSERVE_CONSUMER_GROUP": "coder",
            "MMSERVE_DTYPE": "float32",
        },
    )
    assert result.exit_code == 0, result.output
    settings = seen["settings"]
    assert settings.redis_url == "redis://example:6379/2"
    assert settings.consumer_group == "coder"
    assert settings.max_batch_size == 3
    assert settings.dtype == "float32"


def test_worker_without_redis_url_is_a_usage_error(monkeypatch):
    monkeypatch.delenv("MMSERVE_REDIS_URL", raising=False)
    result = CliRunner().invoke(cli.main, ["worker"])
    assert result.exit_code == 2
    assert "--redis-url" in result.output


def test_every_flag_is_in_the_help():
    for command, flags in {
        "serve": [
            "--workers",
            "--redis-url",
            "--port",
            "--management-port",
            "--model",
            "--threads",
            "--max-queue-depth",
            "--api-key",
            "--dtype",
            "--device",
            "--batch-duration-millis",
        ],
        "api": ["--redis-url", "--port", "--body-size-limit-bytes", "--api-processes"],
        "worker": ["--model", "--consumer-group", "--max-batch-size", "--cache-dir"],
    }.items():
        output = CliRunner().invoke(cli.main, [command, "--help"]).output
        for flag in flags:
            assert flag in output, (command, flag)
            assert "MMSERVE_" + flag.lstrip("-").upper().replace("-", "_") in output


def test_default_threads_leave_a_core_for_redis_and_the_api():
    assert worker_main.default_threads(1, cores=2) == 1
    assert worker_main.default_threads(1, cores=8) == 7
    assert worker_main.default_threads(3, cores=8) == 2
    assert worker_main.default_threads(4, cores=2) == 1


def test_image_flags_reach_the_api_process(monkeypatch, tmp_path):
    from api import wsgi

    seen = {}
    monkeypatch.setattr(cli.os, "execve", lambda path, argv, env: seen.setdefault("env", env))
    monkeypatch.delenv("MMSERVE_ALLOW_REMOTE_IMAGES", raising=False)
    result = CliRunner().invoke(
        cli.main,
        ["api", "--redis-url", "redis://x", "--image-dir", str(tmp_path), "--allow-remote-images"],
    )
    assert result.exit_code == 0, result.output
    settings = wsgi.settings_from_env(seen["env"])
    assert settings.image_dir == str(tmp_path.resolve())
    assert settings.allow_remote_images is True
    output = CliRunner().invoke(cli.main, ["serve", "--help"]).output
    for flag in ("--image-dir", "--allow-remote-images", "--max-image-pixels"):
        assert flag in output
