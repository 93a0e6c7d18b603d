"""gunicorn server hooks (`gunicorn --config python:api.gunicorn_config`).

With several API processes a scrape of /metrics reaches only one of them, so the processes keep their
counters in prometheus-client's multiprocess folder (PROMETHEUS_MULTIPROC_DIR) and /metrics sums it
(api.metrics). The master sets the folder up before it forks: a temporary one, removed at exit, unless the
operator names one. A named folder is used even with one process, and its old files are cleared first:
they would be counted again."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from shared.defaults import METRICS_DIR_ENV

_created: list[Path] = []  # the directory this master made (removed at exit)


def on_starting(server) -> None:
    named = os.environ.get(METRICS_DIR_ENV)
    if named:  # prometheus-client uses it whenever it is set, even for one process
        directory = Path(named)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink()
    elif server.cfg.workers < 2:
        return
    else:
        directory = Path(tempfile.mkdtemp(prefix="mmserve-metrics-"))
        _created.append(directory)
        os.environ[METRICS_DIR_ENV] = str(directory)
    server.log.info("API metrics of %d processes are summed through %s", server.cfg.workers, directory)


def on_exit(server) -> None:
    while _created:
        shutil.rmtree(_created.pop(), ignore_errors=True)
