"""`mmserve serve | api | worker`."""

from __future__ import annotations

import logging
import os
import sys
import uuid

import click
from click.core import ParameterSource

from mmserve import options
from mmserve.supervisor import REDIS, Child, LocalWorkerCommands, Supervisor, python_command
from mmserve.takeoff_config import ManifestError, manifest_from_environment, read_manifest
from shared import logs
from shared.settings import ApiSettings, WorkerSettings, environment_of
from shared.supervision import ReaderSpec

GUNICORN_APP = "api.wsgi:app_from_env()"
GUNICORN_CONFIG = "python:api.gunicorn_config"  # its server hooks


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """mmserve: a Takeoff-compatible text generation server (API + Redis/RQ + batch workers)."""


def _api_env(redis_url: str, api: dict, log_level: str, log_format: str) -> dict[str, str]:
    """The environment the gunicorn app reads back (api/wsgi.py): this one, with the API's settings."""
    env = dict(os.environ)
    values = {"redis_url": redis_url, "log_level": log_level, "log_format": log_format, **api}
    for name, text in environment_of(ApiSettings, values).items():
        if text is None:
            env.pop(name, None)
        else:
            env[name] = text
    return env


def _gunicorn_argv(api: dict, log_level: str, log_format: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--worker-class",
        "gevent",
        "--config",
        GUNICORN_CONFIG,
        "--workers",
        str(api["api_processes"]),
        "--worker-connections",
        "2000",
        "--bind",
        f"{api['host']}:{api['port']}",
        "--bind",
        f"{api['host']}:{api['management_port']}",
        "--bind",
        f"{api['host']}:{api['openai_port']}",
        "--graceful-timeout",
        "30",
        "--keep-alive",
        "5",
        "--log-level",
        log_level.lower(),
        # the app itself logs one line per request (with its request and job ids); gunicorn's
        # access log only adds a second, plain-text line per request, so only in text mode
        *(["--access-logfile", "-"] if log_format == "text" else []),
        GUNICORN_APP,
    ]


def _worker_argv(redis_url: str, worker: dict, log_level: str, log_format: str) -> list[str]:
    argv = python_command(
        "worker", "--redis-url", redis_url, "--log-level", log_level, "--log-format", log_format
    )
    flags = {one.attribute: one.flag for one in options.WORKER}
    for key, value in worker.items():
        for one in value if isinstance(value, tuple | list) else [value]:
            if one is not None:
                argv += [flags[key], str(one)]
    return argv


@main.command()
@options.apply(
    [
        options.REDIS_URL,
        *options.REDIS_TLS,
        *options.SERVE,
        *options.API,
        *options.WORKER,
        options.LOG_LEVEL,
        options.LOG_FORMAT,
    ]
)
def serve(
    redis_url: str | None, workers: int, config: str | None, log_level: str, log_format: str, **kwargs
) -> None:
    """Everything on one machine: Redis (private unless --redis-url), the API and N workers
    (or N workers for each reader of a Takeoff manifest)."""
    from mmserve.redis_server import RedisServer
    from worker.main import default_threads

    redis_url = options.redis_url_with_tls(redis_url, kwargs)
    logs.configure(log_level, log_format)
    api = options.pick(kwargs, options.API)
    worker = options.pick(kwargs, options.WORKER)
    readers = [reader for reader in _takeoff_readers(config, api) for _ in range(workers)]
    if worker["threads"] is None:
        worker["threads"] = default_threads(len(readers))
    if worker.pop("reader_id") is not None:
        raise click.UsageError("--reader-id names one worker; `serve` names its workers itself")
    children: list[Child] = []
    private_redis = None
    if redis_url is None:
        private_redis = RedisServer().start()
        redis_url = private_redis.url
        logging.getLogger("mmserve.serve").info("started a private redis-server at %s", redis_url)
        children.append(Child(REDIS, [], {}, restart=False, process=private_redis.process))
    supervisor_id = uuid.uuid4().hex
    api_env = _api_env(redis_url, {**api, "supervisor_id": supervisor_id}, log_level, log_format)
    children.append(Child("api", _gunicorn_argv(api, log_level, log_format), api_env, restart=False))

    def make_worker(spec: ReaderSpec | None) -> Child:
        """A worker as the flags say, with what `spec` (a reader to start) sets instead."""
        overrides = spec.worker_overrides() if spec is not None else {}
        settings = {**worker, **{key: value for key, value in overrides.items() if value is not None}}
        reader_id = f"{settings['consumer_group']}-{uuid.uuid4().hex[:8]}"
        level = spec.log_level if spec is not None and spec.log_level else log_level
        argv = _worker_argv(redis_url, {**settings, "reader_id": reader_id}, level, log_format)
        env = {**os.environ, **(spec.environment() if spec is not None else {})}
        return Child(f"worker {reader_id}", argv, env, restart=True, reader_id=reader_id)

    children.extend(make_worker(reader) for reader in readers)
    host = "127.0.0.1" if api["host"] in ("0.0.0.0", "::") else api["host"]
    status = Supervisor(
        children,
        ready_url=f"http://{host}:{api['port']}/readyz",
        commands=LocalWorkerCommands(redis_url, supervisor_id, make_worker),
        api_key=api["api_key"],
    ).run()
    if private_redis is not None:
        private_redis.stop()
    sys.exit(status)


def _takeoff_readers(config: str | None, api: dict) -> list[ReaderSpec | None]:
    """The readers of the Takeoff manifest at `config` (or of TAKEOFF_* variables), its server
    config applied to `api` where the API's flags are left at their defaults; [None] (one
    reader as the flags say) without one. click.ClickException for a manifest `serve` cannot run."""
    try:
        manifest = read_manifest(config) if config else manifest_from_environment(os.environ)
        if manifest is None:
            return [None]
        context = click.get_current_context()
        for setting, value in manifest.server.api_settings().items():
            if context.get_parameter_source(setting) is ParameterSource.DEFAULT:
                api[setting] = value
        manifest.check_ports(api["openai_port"])
    except ManifestError as exc:
        raise click.ClickException(str(exc)) from None
    log = logging.getLogger("mmserve.serve")
    if manifest.ignored():
        ignored = ", ".join(manifest.ignored())
        log.warning("Takeoff configuration: ignored key(s) that mean nothing here: %s", ignored)
    for name, reader in manifest.readers.items():
        log.info("Takeoff reader %s: %s for group %r", name, reader.model_name, reader.consumer_group)
    return list(manifest.readers.values()) or [None]


@main.command("api")
@options.apply([options.REDIS_URL, *options.REDIS_TLS, *options.API, options.LOG_LEVEL, options.LOG_FORMAT])
def api_command(redis_url: str | None, log_level: str, log_format: str, **api) -> None:
    """The API alone (gunicorn + gevent) on the inference, management and OpenAI ports."""
    redis_url = options.redis_url_with_tls(redis_url, api)
    if redis_url is None:
        raise click.UsageError("--redis-url (or MMSERVE_REDIS_URL) is required")
    env = _api_env(redis_url, api, log_level, log_format)
    os.execve(sys.executable, _gunicorn_argv(api, log_level, log_format), env)


@main.command("worker")
@options.apply(
    [options.REDIS_URL, *options.REDIS_TLS, *options.WORKER, options.LOG_LEVEL, options.LOG_FORMAT]
)
def worker_command(redis_url: str | None, log_level: str, log_format: str, **worker) -> None:
    """One worker process: loads the model and serves its consumer group's queue."""
    from worker.main import run_worker

    redis_url = options.redis_url_with_tls(redis_url, worker)

    if redis_url is None:
        raise click.UsageError("--redis-url (or MMSERVE_REDIS_URL) is required")
    logs.configure(log_level, log_format)
    run_worker(WorkerSettings(redis_url=redis_url, log_level=log_level, log_format=log_format, **worker))
