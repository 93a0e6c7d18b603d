"""Takeoff's configuration, read by `mmserve serve`: a manifest (`--config config.yaml`) or
TAKEOFF_* environment variables, as a Takeoff deployment gives them.

A manifest is `takeoff: {server_config: {...}, readers_config: {<name>: {...}}}`. Each
reader becomes the worker processes of its consumer group (`--workers` of them), with the
reader's settings (shared.supervision.ReaderSpec, which POST /reader takes too); the server
config sets the API's ports and limits. Keys mmserve ignores (a GPU engine's knobs) are
named in one warning line; unknown keys, a reader without `model_name` or one port given
twice stop `serve` with a message naming them.

Without a manifest, TAKEOFF_<KEY> variables (TAKEOFF_MODEL_NAME, TAKEOFF_CONSUMER_GROUP,
TAKEOFF_PORT, ...) make a manifest of one reader and the server config, so a compose file
written for Takeoff runs by changing the image."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.supervision import ReaderSpec

ENV_PREFIX = "TAKEOFF_"
# server_config keys that mean nothing to mmserve (it always serves /metrics; readers report
# through Redis heartbeats of their own; no Vertex AI port; models load from the Hugging Face cache)
IGNORED_SERVER_KEYS = ("echo", "enable_metrics", "heartbeat_check_interval", "vertex_port", "repository_path")
# server_config keys and the API settings they set
SERVER_SETTINGS = {
    "port": "port",
    "management_port": "management_port",
    "body_size_limit_bytes": "body_size_limit_bytes",
    "allow_remote_images": "allow_remote_images",
}


class ManifestError(ValueError):
    """A Takeoff configuration `serve` cannot run; the message names what is wrong."""


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    port: int | None = Field(None, ge=1, le=65535)
    management_port: int | None = Field(None, ge=1, le=65535)
    body_size_limit_bytes: int | None = Field(None, ge=1)
    allow_remote_images: bool | None = None
    echo: bool | None = None
    enable_metrics: bool | None = None
    heartbeat_check_interval: int | None = None
    vertex_port: int | None = None
    repository_path: str | None = None

    def api_settings(self) -> dict[str, Any]:
        """The API settings the server config sets."""
        values = {setting: getattr(self, key) for key, setting in SERVER_SETTINGS.items()}
        return {setting: value for setting, value in values.items() if value is not None}


class Sections(BaseModel):
    model_config = ConfigDict(extra="forbid")

    server_config: ServerConfig = Field(default_factory=ServerConfig)
    readers_config: dict[str, ReaderSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _readers_name_their_model(self) -> Sections:
        nameless = [name for name, reader in self.readers_config.items() if not reader.model_name]
        if nameless:
            raise ValueError(f"reader(s) {', '.join(nameless)} give no model_name")
        return self


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    takeoff: Sections

    @property
    def server(self) -> ServerConfig:
        return self.takeoff.server_config

    @property
    def readers(self) -> dict[str, ReaderSpec]:
        return self.takeoff.readers_config

    def ignored(self) -> list[str]:
        """The keys given that mmserve ignores, by where they are."""
        found = [
            f"server_config.{key}" for key in IGNORED_SERVER_KEYS if getattr(self.server, key) is not None
        ]
        for name, reader in self.readers.items():
            found.extend(f"readers_config.{name}.{key}" for key in reader.ignored())
        return found

    def check_ports(self, openai_port: int) -> None:
        """ManifestError when two of the API's ports are one."""
        ports = {"port": self.server.port, "management_port": self.server.management_port}
        ports["openai port"] = openai_port
        seen: dict[int, str] = {}
        for name, port in ports.items():
            if port is None:
                continue
            if port in seen:
                raise ManifestError(f"{seen[port]} and {name} are both {port}: each port serves one thing")
            seen[port] = name


def read_manifest(path: str | Path) -> Manifest:
    """The manifest in the YAML file at `path`; ManifestError naming what is wrong."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ManifestError(f"cannot read the manifest {path}: {exc.strerror or exc}") from None
    try:
        document = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ManifestError(f"the manifest {path} is not valid YAML: {exc}") from None
    if not isinstance(document, dict) or "takeoff" not in document:
        raise ManifestError(f"the manifest {path} must hold a `takeoff:` mapping")
    return _validated(document, str(path))


def manifest_from_environment(environ: Mapping[str, str]) -> Manifest | None:
    """The manifest TAKEOFF_* variables make (one reader, named "reader", when
    TAKEOFF_MODEL_NAME is set), or None when none is set."""
    given = {
        name.removeprefix(ENV_PREFIX).lower(): value
        for name, value in environ.items()
        if name.startswith(ENV_PREFIX)
    }
    if not given:
        return None
    server_keys, reader_keys = set(ServerConfig.model_fields), set(ReaderSpec.model_fields)
    unknown = sorted(key for key in given if key not in server_keys | reader_keys)
    if unknown:
        names = ", ".join(ENV_PREFIX + key.upper() for key in unknown)
        raise ManifestError(f"unknown Takeoff variable(s): {names}")
    server = {key: value for key, value in given.items() if key in server_keys}
    reader = {key: value for key, value in given.items() if key in reader_keys}
    readers = {"reader": reader} if reader else {}
    return _validated(
        {"takeoff": {"server_config": server, "readers_config": readers}}, "TAKEOFF_* variables"
    )


def _validated(document: dict, source: str) -> Manifest:
    try:
        return Manifest.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(_problem(error) for error in exc.errors())
        raise ManifestError(f"{source}: {problems}") from None


def _problem(error: Mapping[str, Any]) -> str:
    where = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown key {where}"
    if error["type"] == "missing":
        return f"missing key {where}"
    return f"{where}: {error['msg']}" if where else str(error["msg"])


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)
