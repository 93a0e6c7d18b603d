"""A Takeoff deployment's manifest run by `mmserve serve --config config.yaml`: a text reader
and a vision-language reader in their own groups, on the ports the manifest's server config
names, both answering the published Takeoff client; ignored keys named in one warning line."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import requests
import yaml
from takeoff_client import TakeoffClient

from mmserve.redis_server import free_port
from tests.support.image_requests import IMAGES, payload, post_image

pytestmark = pytest.mark.e2e

READY_TIMEOUT = 180.0


@pytest.fixture(scope="module")
def served(tiny_model_dir, tiny_vlm_dir, tmp_path_factory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("takeoff-manifest")
    ports = {"port": free_port(), "management_port": free_port()}
    manifest = {
        "takeoff": {
            "server_config": {**ports, "enable_metrics": True},
            "readers_config": {
                "writer": {
                    "model_name": str(tiny_model_dir),
                    "device": "cpu",
                    "consumer_group": "text",
                    "max_batch_size": 4,
                    "tensor_parallel": 1,
                },
                "looker": {
                    "model_name": str(tiny_vlm_dir("llava")),
                    "device": "cpu",
                    "consumer_group": "vision",
                },
            },
        }
    }
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(manifest))
    log_path = root / "serve.log"
    argv = [sys.executable, "-m", "mmserve", "serve", "--config", str(config), "--host", "127.0.0.1"]
    argv += ["--openai-port", str(free_port()), "--dtype", "float32", "--threads", "1"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{ports['port']}"
        try:
            wait_ready(url, f"http://127.0.0.1:{ports['management_port']}", process, log_path)
            yield {"url": url, **ports, "log": log_path}
        finally:
            process.send_signal(signal.SIGINT)  # Ctrl-C: serve stops its Redis, API and workers
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_ready(url: str, management_url: str, process: subprocess.Popen, log_path) -> None:
    """/readyz answers 200 and both groups (text and vision) have a worker."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        try:
            ready = requests.get(url + "/readyz", timeout=1).status_code == 200
            if ready and {"text", "vision"} <= set(
                requests.get(management_url + "/reader_groups", timeout=2).json()
            ):
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(
        "serve --config did not become ready:\n" + log_path.read_text(errors="replace")[-5000:]
    )


def test_each_reader_answers_in_its_group_on_the_manifests_ports(served):
    client = TakeoffClient(
        base_url="http://127.0.0.1", port=served["port"], mgmt_port=served["management_port"]
    )
    groups = client.get_readers()
    assert {reader["model_name"] for reader in groups["text"]} != {
        reader["model_name"] for reader in groups["vision"]
    }
    answer = client.generate("Hello there", consumer_group="text", max_new_tokens=5, min_new_tokens=5)
    assert isinstance(answer["text"], str) and answer["text"]
    response = post_image(served["url"], IMAGES["red"], payload("What colour?", consumer_group="vision"))
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["text"], str)
    text_only = post_image(served["url"], IMAGES["red"], payload("What colour?", consumer_group="text"))
    assert text_only.status_code == 400, text_only.text  # the text group's model takes no images


def test_keys_that_mean_nothing_here_are_named_in_one_warning(served):
    lines = [line for line in served["log"].read_text().splitlines() if "ignored key(s)" in line]
    assert len(lines) == 1
    assert "server_config.enable_metrics" in lines[0] and "readers_config.writer.tensor_parallel" in lines[0]
