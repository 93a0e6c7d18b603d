"""Several API processes (--api-processes): every scrape counts all of them
(api.gunicorn_config sets up prometheus-client's multiprocess directory,
api.metrics sums it)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from api import gunicorn_config
from shared.defaults import METRICS_DIR_ENV

REPO = Path(__file__).resolve().parents[3]

# One API process: answers `requests` POST /generate, then renders /metrics.
API_PROCESS = textwrap.dedent(
    """
    import sys
    import fakeredis
    from api.metrics import ApiMetrics

    class Hub:
        connected = True
        open_subscriptions = 0

    metrics = ApiMetrics(fakeredis.FakeRedis(), Hub())
    for _ in range(int(sys.argv[1])):
        metrics.observe_request("/generate", "POST", 200, 0.1)
    sys.stdout.write(metrics.render().decode())
    """
)


def api_process(requests: int, env: dict) -> str:
    """What /metrics says in a fresh process (prometheus-client picks its mode at import)."""
    done = subprocess.run(
        [sys.executable, "-c", API_PROCESS, str(requests)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for one in family.samples:
            if one.name == name and one.labels == labels:
                return one.value
    return None


def test_a_scrape_sums_the_requests_every_process_answered(tmp_path):
    env = {**os.environ, METRICS_DIR_ENV: str(tmp_path)}
    api_process(3, env)
    api_process(2, env)
    scrape = api_process(0, env)  # a process that answered none of them
    requests = {"route": "/generate", "method": "POST", "status": "200"}
    assert sample(scrape, "mmserve_api_requests_total", **requests) == 5
    assert sample(scrape, "mmserve_api_request_duration_seconds_count", route="/generate") == 5
    assert sample(scrape, "mmserve_redis_up") == 1  # the Redis gauges still come with it


def test_one_process_keeps_its_counters_in_memory(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != METRICS_DIR_ENV}
    api_process(3, env)
    assert sample(api_process(0, env), "mmserve_api_requests_total", route="/generate") is None
    assert not any(tmp_path.iterdir())


@pytest.fixture
def no_metrics_dir():
    saved = os.environ.pop(METRICS_DIR_ENV, None)
    yield
    os.environ.pop(METRICS_DIR_ENV, None)
    if saved is not None:
        os.environ[METRICS_DIR_ENV] = saved


def master(workers: int) -> SimpleNamespace:
    return SimpleNamespace(cfg=SimpleNamespace(workers=workers), log=SimpleNamespace(info=print))


def test_the_master_gives_several_processes_a_fresh_directory_and_removes_it(no_metrics_dir):
    gunicorn_config.on_starting(master(2))
    directory = Path(os.environ[METRICS_DIR_ENV])
    assert directory.is_dir() and not any(directory.iterdir())
    gunicorn_config.on_exit(master(2))
    assert not directory.exists()


def test_one_process_needs_no_directory(no_metrics_dir):
    gunicorn_config.on_starting(master(1))
    assert METRICS_DIR_ENV not in os.environ


def test_a_directory_the_operator_names_is_cleared_of_old_counts_and_kept(no_metrics_dir, tmp_path):
    (tmp_path / "counter_123.db").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("mine")
    os.environ[METRICS_DIR_ENV] = str(tmp_path)
    gunicorn_config.on_starting(master(3))
    gunicorn_config.on_exit(master(3))
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


def test_a_directory_the_operator_names_is_made_and_cleared_for_one_process_too(no_metrics_dir, tmp_path):
    named = tmp_path / "metrics"
    os.environ[METRICS_DIR_ENV] = str(named)
    gunicorn_config.on_starting(master(1))
    assert named.is_dir()
    (named / "counter_1.db").write_bytes(b"old")
    gunicorn_config.on_starting(master(1))
    assert not any(named.iterdir())
