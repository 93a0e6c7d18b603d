"""docker-compose.yml and the Dockerfile, checked by reading (no Docker engine here)."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
import yaml

from mmserve import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def known_env_vars() -> set[str]:
    names = set()
    for command in cli.main.commands.values():
        for param in command.params:
            if isinstance(param, click.Option) and param.envvar:
                names.add(param.envvar)
    return names


def test_services_ports_and_healthchecks(compose):
    services = compose["services"]
    assert {"redis", "api", "worker"} <= set(services)
    assert {"3000:3000", "3001:3001"} <= set(services["api"]["ports"])
    assert "healthcheck" in services["redis"] and "healthcheck" in services["api"]
    assert "--appendonly" in services["redis"]["command"]  # persistence
    assert services["api"]["command"] == ["mmserve", "api"]
    assert services["worker"]["command"] == ["mmserve", "worker"]
    assert "ports" not in services["worker"]  # so `--scale worker=N` works
    assert services["rq-dashboard"]["profiles"] == ["dashboard"]
    assert "--json" in services["rq-dashboard"]["command"]


def test_every_env_var_compose_sets_is_one_the_cli_knows(compose):
    known = known_env_vars()
    for name, service in compose["services"].items():
        for variable in service.get("environment", {}):
            if variable.startswith("MMSERVE_"):
                assert variable in known, f"{name} sets {variable}, which no mmserve flag reads"


def test_commented_examples_in_compose_name_real_env_vars():
    known = known_env_vars()
    mentioned = set(re.findall(r"#\s*(MMSERVE_[A-Z_]+):", (ROOT / "docker-compose.yml").read_text()))
    assert mentioned and mentioned <= known


def test_dockerfile_is_non_root_with_a_model_cache_volume_and_the_ports():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.MULTILINE)
    assert 'VOLUME ["/cache"]' in dockerfile and "MMSERVE_CACHE_DIR=/cache" in dockerfile
    assert re.search(r"^EXPOSE 3000 3001", dockerfile, re.MULTILINE)
    assert "ARG TORCH_SPEC" in dockerfile and "ARG TORCH_INDEX" in dockerfile
    for package_dir in ("api", "worker", "shared", "mmserve"):
        assert f"COPY {package_dir} ./{package_dir}" in dockerfile
