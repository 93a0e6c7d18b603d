"""Takeoff's configuration (mmserve/takeoff_config.py): a manifest or TAKEOFF_* variables
become `serve`'s readers and API settings; what cannot run stops `serve` with a message
naming it."""

from __future__ import annotations

import os
import textwrap

import pytest
from click.testing import CliRunner

from mmserve import cli
from mmserve.takeoff_config import ManifestError, manifest_from_environment, read_manifest

MANIFEST = """
takeoff:
  server_config:
    port: 4000
    management_port: 4001
    body_size_limit_bytes: 1000000
    enable_metrics: true
  readers_config:
    chat:
      model_name: /models/chat
      device: CPU
      consumer_group: text
      max_batch_size: 4
      batch_duration_millis: 30
      quant_type: int8
      tensor_parallel: 2
      cuda_visible_devices: "0,1"
    looker:
      model_name: /models/vlm
      device: cpu
      consumer_group: vision
      log_level: debug
"""


def write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_a_manifest_sets_readers_and_the_api(tmp_path):
    manifest = read_manifest(write(tmp_path, MANIFEST))
    chat, looker = manifest.readers["chat"], manifest.readers["looker"]
    assert chat.worker_overrides() == {
        "model": "/models/chat",
        "consumer_group": "text",
        "max_batch_size": 4,
        "batch_duration_millis": 30,
        "device": "cpu",
        "dtype": None,
        "threads": None,
        "quantize": "int8",
    }
    assert chat.environment() == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert looker.log_level == "DEBUG" and looker.consumer_group == "vision"
    assert manifest.server.api_settings() == {
        "port": 4000,
        "management_port": 4001,
        "body_size_limit_bytes": 1000000,
    }
    assert manifest.ignored() == ["server_config.enable_metrics", "readers_config.chat.tensor_parallel"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            MANIFEST.replace("tensor_parallel", "tensor_paralel"),
            "unknown key takeoff.readers_config.chat.tensor_paralel",
        ),
        (
            MANIFEST.replace("echo", "x").replace("enable_metrics", "metrics"),
            "unknown key takeoff.server_config.metrics",
        ),
        (MANIFEST.replace("      model_name: /models/vlm\n", ""), "looker give no model_name"),
        (MANIFEST.replace("quant_type: int8", "quant_type: awq"), "quant_type"),
        (MANIFEST.replace("    looker:", "    chat:"), "'chat' is given twice"),
        ("takeoff: [1, 2]", "takeoff: Input should be a valid dictionary"),
        ("readers_config: {}", "must hold a `takeoff:` mapping"),
        ("takeoff: {a: [}", "not valid YAML"),
    ],
)
def test_a_manifest_serve_cannot_run_is_refused_by_name(tmp_path, text, message):
    with pytest.raises(ManifestError, match=message.replace("[", r"\[")):
        read_manifest(write(tmp_path, text))


def test_a_missing_manifest_is_named(tmp_path):
    with pytest.raises(ManifestError, match="cannot read the manifest"):
        read_manifest(tmp_path / "nowhere.yaml")


def test_takeoff_variables_make_one_reader():
    assert manifest_from_environment({"PATH": "/bin", "MMSERVE_PORT": "1"}) is None
    manifest = manifest_from_environment(
        {
            "TAKEOFF_MODEL_NAME": "m",
            "TAKEOFF_CONSUMER_GROUP": "g",
            "TAKEOFF_MAX_BATCH_SIZE": "3",
            "TAKEOFF_PORT": "9",
        }
    )
    reader = manifest.readers["reader"]
    assert (reader.model_name, reader.consumer_group, reader.max_batch_size) == ("m", "g", 3)
    assert manifest.server.port == 9
    with pytest.raises(ManifestError, match="TAKEOFF_COLOUR"):
        manifest_from_environment({"TAKEOFF_MODEL_NAME": "m", "TAKEOFF_COLOUR": "red"})
    with pytest.raises(ManifestError, match="no model_name"):
        manifest_from_environment({"TAKEOFF_CONSUMER_GROUP": "g"})


class Started:
    """Stands in for the supervisor: keeps the children `serve` would start."""

    children: list = []

    def __init__(self, children, ready_url, commands=None, api_key=None):
        Started.children = children
        Started.ready_url = ready_url

    def run(self) -> int:
        return 0


def serve(monkeypatch, *args: str, env: dict | None = None):
    monkeypatch.setattr(cli, "Supervisor", Started)
    for name in ("TAKEOFF_MODEL_NAME", "TAKEOFF_PORT"):
        monkeypatch.delenv(name, raising=False)
    return CliRunner().invoke(cli.main, ["serve", "--redis-url", "redis://localhost:1/0", *args], env=env)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_serve_starts_each_readers_workers_and_the_api_as_the_manifest_says(tmp_path, monkeypatch):
    result = serve(
        monkeypatch, "--config", str(write(tmp_path, MANIFEST)), "--workers", "2", "--max-batch-size", "6"
    )
    assert result.exit_code == 0, result.output
    api, *workers = Started.children
    assert api.env["MMSERVE_PORT"] == "4000" and api.env["MMSERVE_MANAGEMENT_PORT"] == "4001"
    assert Started.ready_url.endswith(":4000/readyz")
    assert [flag(w.argv, "--consumer-group") for w in workers] == ["text", "text", "vision", "vision"]
    chat, looker = workers[0], workers[2]
    assert flag(chat.argv, "--model") == "/models/chat" and flag(chat.argv, "--quantize") == "int8"
    assert flag(chat.argv, "--max-batch-size") == "4"  # the reader's own
    assert flag(looker.argv, "--max-batch-size") == "6"  # the flag's, where the reader says nothing
    assert flag(chat.argv, "--log-level") == "INFO" and flag(looker.argv, "--log-level") == "DEBUG"
    assert chat.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert looker.env.get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")
    assert flag(chat.argv, "--threads") == "1"  # four workers share the machine


def test_flags_given_win_over_the_manifests_server_config(tmp_path, monkeypatch):
    result = serve(monkeypatch, "--config", str(write(tmp_path, MANIFEST)), "--port", "5000")
    assert result.exit_code == 0, result.output
    assert Started.children[0].env["MMSERVE_PORT"] == "5000"


def test_serve_reads_takeoff_variables_and_refuses_what_cannot_run(tmp_path, monkeypatch):
    result = serve(monkeypatch, env={"TAKEOFF_MODEL_NAME": "/models/m", "TAKEOFF_CONSUMER_GROUP": "g"})
    assert result.exit_code == 0, result.output
    (worker,) = Started.children[1:]
    assert flag(worker.argv, "--model") == "/models/m" and flag(worker.argv, "--consumer-group") == "g"
    clash = MANIFEST.replace("management_port: 4001", "management_port: 4000")
    result = serve(monkeypatch, "--config", str(write(tmp_path, clash)))
    assert result.exit_code != 0 and "port and management_port are both 4000" in result.output
    result = serve(monkeypatch, "--config", str(write(tmp_path, MANIFEST.replace("quant_type", "quantype"))))
    assert result.exit_code != 0 and "unknown key takeoff.readers_config.chat.quantype" in result.output
