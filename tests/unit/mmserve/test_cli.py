from __future__ import annotations

import pytest
from click.testing import CliRunner

from mmserve import cli
from shared.settings import WorkerSettings
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
        "worker": [
            "--model",
            "--consumer-group",
            "--max-batch-size",
            "--cache-dir",
            "--lora-dir",
            "--lora",
            "--max-loras",
            "--quantize",
            "--pack-weights",
            "--fuse-layers",
            "--prefill-width-multiple",
            "--joint-prefill",
        ],
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


def test_lora_flags_reach_the_worker_and_serve_passes_each_one_on(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(worker_main, "run_worker", lambda settings: seen.setdefault("settings", settings))
    result = CliRunner().invoke(
        cli.main,
        ["worker", "--lora", "a=/x/a", "--lora", "b=/x/b", "--max-loras", "2"],
        env={"MMSERVE_REDIS_URL": "redis://x", "MMSERVE_LORA_DIR": str(tmp_path)},
    )
    assert result.exit_code == 0, result.output
    settings = seen["settings"]
    assert (settings.lora, settings.max_loras, settings.lora_dir) == (("a=/x/a", "b=/x/b"), 2, str(tmp_path))
    argv = cli._worker_argv("redis://x", {"lora": ("a=/x/a", "b=/x/b"), "lora_dir": None}, "INFO", "text")
    assert argv[-4:] == ["--lora", "a=/x/a", "--lora", "b=/x/b"]
    assert "--lora-dir" not in argv


def test_a_lora_flag_without_a_path_stops_the_worker_before_its_model_loads(tmp_path):
    with pytest.raises(ValueError, match="name=path"):
        worker_main.lora_catalog(WorkerSettings(redis_url="redis://x", lora=("just-a-name",)))
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        worker_main.lora_catalog(WorkerSettings(redis_url="redis://x", lora=(f"a={tmp_path}",)))


def test_quantize_int8_loads_full_precision_weights_and_refuses_what_it_cannot_honour(tmp_path):
    from worker.engine.adapters import AdapterCatalog

    settings = WorkerSettings(redis_url="redis://x", quantize="int8")
    assert worker_main.compute_dtype(settings, AdapterCatalog()) == "float32"
    with pytest.raises(ValueError, match="--dtype"):
        worker_main.compute_dtype(
            WorkerSettings(redis_url="x", quantize="int8", dtype="bfloat16"), AdapterCatalog()
        )
    with pytest.raises(ValueError, match="LoRA"):
        worker_main.compute_dtype(settings, AdapterCatalog(directory=tmp_path))
    assert (
        worker_main.compute_dtype(WorkerSettings(redis_url="x", dtype="bfloat16"), AdapterCatalog())
        == "bfloat16"
    )


def test_quantize_int4_loads_bfloat16_weights_and_refuses_other_dtypes(tmp_path):
    from worker.engine.adapters import AdapterCatalog

    settings = WorkerSettings(redis_url="redis://x", quantize="int4")
    assert worker_main.compute_dtype(settings, AdapterCatalog()) == "bfloat16"
    for dtype in ("float32", "float16"):
        with pytest.raises(ValueError, match="bfloat16"):
            worker_main.compute_dtype(
                WorkerSettings(redis_url="x", quantize="int4", dtype=dtype), AdapterCatalog()
            )
    with pytest.raises(ValueError, match="LoRA"):
        worker_main.compute_dtype(settings, AdapterCatalog(directory=tmp_path))


def test_pack_weights_reaches_the_worker_and_decides_how_its_model_loads(monkeypatch, tiny_model_dir):
    import torch
    from torch import nn

    from worker.engine.models.weight_packing import PackedLinear, packing_applies

    seen = {}
    monkeypatch.setattr(worker_main, "run_worker", lambda settings: seen.setdefault("settings", settings))
    result = CliRunner().invoke(
        cli.main, ["worker"], env={"MMSERVE_REDIS_URL": "redis://x", "MMSERVE_PACK_WEIGHTS": "off"}
    )
    assert result.exit_code == 0, result.output
    assert seen["settings"].pack_weights == "off"
    argv = cli._worker_argv("redis://x", {"pack_weights": "off"}, "INFO", "text")
    assert argv[-2:] == ["--pack-weights", "off"]
    seen.clear()
    result = CliRunner().invoke(cli.main, ["worker", "--redis-url", "redis://x", "--fuse-layers", "off"])
    assert result.exit_code == 0, result.output
    assert seen["settings"].fuse_layers == "off"
    seen.clear()
    result = CliRunner().invoke(cli.main, ["worker", "--redis-url", "redis://x", "--joint-prefill", "off"])
    assert result.exit_code == 0, result.output
    assert seen["settings"].joint_prefill == "off"

    def packed_layers(**flags) -> int:
        settings = WorkerSettings(redis_url="x", model=str(tiny_model_dir), dtype="bfloat16", **flags)
        loaded = worker_main.load_for_serving(settings)
        assert loaded.dtype == torch.bfloat16
        return sum(isinstance(module, PackedLinear) for module in loaded.model.modules())

    assert packed_layers(pack_weights="off") == 0
    if packing_applies(nn.Linear(2, 2)):
        assert packed_layers() > 0


def test_the_event_timeout_and_keepalive_are_flags_that_reach_the_api_process(monkeypatch):
    from api import wsgi

    seen = {}
    monkeypatch.setattr(cli.os, "execve", lambda path, argv, env: seen.setdefault("env", env))
    result = CliRunner().invoke(
        cli.main,
        ["api", "--redis-url", "redis://x", "--next-event-timeout-seconds", "7.5"],
        env={"MMSERVE_SSE_KEEPALIVE_SECONDS": "3"},
    )
    assert result.exit_code == 0, result.output
    settings = wsgi.settings_from_env(seen["env"])
    assert (settings.next_event_timeout_seconds, settings.keepalive_seconds) == (7.5, 3.0)
    result = CliRunner().invoke(cli.main, ["api", "--redis-url", "redis://x", "--sse-keepalive-seconds", "0"])
    assert result.exit_code == 2


def test_an_unset_api_setting_is_taken_out_of_the_api_process_environment(monkeypatch):
    monkeypatch.setenv("MMSERVE_API_KEY", "from-the-shell")
    env = cli._api_env("redis://x", {"api_key": None, "port": 4000}, "DEBUG", "json")
    assert "MMSERVE_API_KEY" not in env
    assert (env["MMSERVE_PORT"], env["MMSERVE_LOG_LEVEL"], env["MMSERVE_LOG_FORMAT"]) == (
        "4000",
        "DEBUG",
        "json",
    )


def test_redis_tls_flags_are_folded_into_the_url_each_process_gets(monkeypatch, tmp_path):
    from urllib.parse import parse_qs, urlsplit

    from api import wsgi

    seen = {}
    monkeypatch.setattr(cli.os, "execve", lambda path, argv, env: seen.setdefault("env", env))
    monkeypatch.setattr(worker_main, "run_worker", lambda settings: seen.setdefault("worker", settings))
    flags = [
        "--redis-url",
        "rediss://u:p@redis:6380/1",
        "--redis-ca-file",
        "/ca.pem",
        "--redis-cert-file",
        "/c.pem",
    ]
    assert CliRunner().invoke(cli.main, ["api", *flags]).exit_code == 0
    result = CliRunner().invoke(cli.main, ["worker", *flags], env={"MMSERVE_REDIS_KEY_FILE": "/k.pem"})
    assert result.exit_code == 0, result.output
    for url in (
        wsgi.settings_from_env(seen["env"]).redis_connection_url,
        seen["worker"].redis_connection_url,
    ):
        parts = urlsplit(url)
        assert (parts.scheme, parts.netloc, parts.path) == ("rediss", "u:p@redis:6380", "/1")
        query = parse_qs(parts.query)
        assert query["ssl_ca_certs"] == ["/ca.pem"] and query["ssl_certfile"] == ["/c.pem"]
    assert parse_qs(urlsplit(seen["worker"].redis_url).query)["ssl_keyfile"] == ["/k.pem"]


def test_redis_tls_flags_without_a_rediss_url_are_a_usage_error():
    result = CliRunner().invoke(
        cli.main, ["worker", "--redis-url", "redis://x", "--redis-ca-file", "/ca.pem"]
    )
    assert result.exit_code == 2
    assert "rediss://" in result.output
