"""`mmserve serve`: Redis (private, unless a URL is given), the API and N workers as child processes of
one supervisor. Ctrl-C or SIGTERM stops them all; a worker that dies is restarted; if the API or Redis
dies, everything stops and the command fails."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
import requests

from shared import supervision
from shared.connection import connect

log = logging.getLogger("mmserve.serve")

STOP_GRACE_SECONDS = 20.0
RESTART_BACKOFF_SECONDS = 2.0
QUICK_FAILURE_SECONDS = 60  # a worker dying this soon after start is probably misconfigured
MAX_QUICK_FAILURES = 3
REDIS = "redis"


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    restart: bool
    process: subprocess.Popen | None = None
    reader_id: str | None = None  # workers: the name they register under
    retired: bool = False  # asked to stop for good (DELETE /reader): not restarted
    added_later: bool = False  # started through POST /reader: its failures never stop `serve`
    restarts: int = 0
    quick_failures: int = 0  # exits soon after starting, in a row
    started_at: float = 0.0
    exited_at: float | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, env=self.env, start_new_session=True)
        self.started_at = time.monotonic()
        self.exited_at = None
        log.info("started %s (pid %d)", self.name, self.process.pid)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)


class LocalWorkerCommands:
    """Carries out the API's POST /reader and DELETE /reader/{id} (shared.supervision)."""

    def __init__(
        self, redis_url: str, supervisor_id: str, make_worker: Callable[[supervision.ReaderSpec], Child]
    ):
        self._connection = connect(redis_url, socket_timeout=5)
        self._supervisor_id = supervisor_id
        self._make_worker = make_worker

    def poll(self, supervisor: Supervisor) -> None:
        try:
            for call, command in supervision.take_commands(self._connection, self._supervisor_id):
                supervision.answer(self._connection, call, self._carry_out(command, supervisor))
        except redis.RedisError as exc:
            log.debug("could not read worker commands: %s", exc)

    def _carry_out(self, command: supervision.Command, supervisor: Supervisor) -> supervision.Reply:
        if command.action == "start":
            spec = command.spec or supervision.ReaderSpec()
            if spec.ignored():
                ignored = ", ".join(spec.ignored())
                log.warning("POST /reader: ignored key(s) that mean nothing here: %s", ignored)
            child = self._make_worker(spec)
            child.added_later = True
            child.start()
            supervisor.children.append(child)
            return supervision.Reply(ok=True, status=201, reader_id=child.reader_id, pid=child.process.pid)
        for child in supervisor.children:
            if child.reader_id == command.reader_id and not child.retired:
                child.retired = True
                child.signal(signal.SIGTERM)
                log.info("stopping %s on request", child.name)
                return supervision.Reply(ok=True, reader_id=child.reader_id, pid=child.process.pid)
        return supervision.Reply(
            ok=False,
            status=409,
            error=f"reader '{command.reader_id}' was not started by this `mmserve serve`",
        )


class Supervisor:
    """Starts the children, restarts workers that exit, and stops everything on a signal or when a child
    that cannot be restarted (the API, Redis) exits. `run` returns the command's exit status."""

    def __init__(
        self,
        children: list[Child],
        ready_url: str,
        commands: LocalWorkerCommands | None = None,
        api_key: str | None = None,
    ):
        """`ready_url`: the API's /readyz, asked with `api_key` (--api-key) if there is one."""
        self.children = children
        self.ready_url = ready_url
        self._ready_headers = {"X-API-Key": api_key} if api_key else {}
        self.commands = commands
        self._stopping = False
        self._status = 0

    def _request_stop(self, signum, frame) -> None:
        if not self._stopping:
            log.info("stopping (signal %d)", signum)
        self._stopping = True

    def _fail(self, message: str, *args) -> None:
        log.error(message, *args)
        self._status = 1
        self._stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._request_stop)
        signal.signal(signal.SIGTERM, self._request_stop)
        for child in self.children:
            if child.process is None:
                child.start()
        announced = False
        try:
            while not self._stopping:
                if self.commands is not None:
                    self.commands.poll(self)
                for child in list(self.children):
                    if not child.running:
                        self._tend(child)
                    if self._stopping:
                        break
                if not announced and self._ready():
                    log.info("mmserve is ready: %s", self.ready_url.rsplit("/", 1)[0])
                    announced = True
                time.sleep(0.5)
        finally:
            self.stop()
        return self._status

    def _tend(self, child: Child) -> None:
        """A child that is not running: forget it, restart it (after a back-off), or stop everything."""
        if child.retired:
            log.info("%s stopped", child.name)
            self.children.remove(child)
            return
        if not child.restart:
            self._fail("%s exited with code %s; stopping everything", child.name, child.process.returncode)
            return
        if child.exited_at is None and not self._note_exit(child):
            return
        if time.monotonic() - child.exited_at < RESTART_BACKOFF_SECONDS:
            return
        child.restarts += 1
        log.warning(
            "%s exited with code %s; restarting (restart %d)",
            child.name,
            child.process.returncode,
            child.restarts,
        )
        child.start()

    def _note_exit(self, child: Child) -> bool:
        """Count a worker's exit; False when it failed too quickly too often to be restarted.
        A worker started through POST /reader is then dropped; one `serve` started stops everything."""
        child.exited_at = time.monotonic()
        lived = child.exited_at - child.started_at
        child.quick_failures = child.quick_failures + 1 if lived < QUICK_FAILURE_SECONDS else 0
        if child.quick_failures < MAX_QUICK_FAILURES:
            return True
        if child.added_later:
            log.error(
                "%s (started through POST /reader) failed %d times in a row; giving up on it",
                child.name,
                child.quick_failures,
            )
            self.children.remove(child)
        else:
            self._fail(
                "%s failed %d times in a row within %d s of starting (exit code %s); "
                "stopping everything — see its log above",
                child.name,
                child.quick_failures,
                QUICK_FAILURE_SECONDS,
                child.process.returncode,
            )
        return False

    def _ready(self) -> bool:
        try:
            return requests.get(self.ready_url, headers=self._ready_headers, timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        # Workers and the API first (they finish what they hold), the private Redis last.
        first = [child for child in self.children if child.name != REDIS]
        last = [child for child in self.children if child.name == REDIS]
        for group in (first, last):
            for child in group:
                child.signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_SECONDS
            for child in group:
                if child.process is None:
                    continue
                try:
                    child.process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in time; killing it", child.name)
                    child.signal(signal.SIGKILL)
                    child.process.wait()


def python_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmserve", *args]
