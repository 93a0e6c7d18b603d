"""The benches' shared figures and workload, and that every bench module imports."""

import importlib
import pkgutil

import pytest

import bench
from bench.common import median_of, percentile, stream_summary
from bench.worker_load import arrival_times, workload


def test_percentile_is_nearest_rank_and_none_without_values():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 3.0
    assert percentile(values, 95) == 5.0
    assert percentile(values, 100) == 5.0
    assert percentile([], 50) is None


def test_median_of_merges_runs_number_by_number_and_keeps_the_first_run_otherwise():
    runs = [
        {"tokens_per_s": 10.0, "ratio": 1.5, "note": "first", "ok": True, "rows": {"a": 1}},
        {"tokens_per_s": 30.0, "ratio": 0.5, "note": "second", "ok": False, "rows": {"a": 5}},
        {"tokens_per_s": 20.0, "ratio": 1.0, "note": "third", "ok": True, "rows": {"a": 3}},
    ]
    assert median_of(runs) == {
        "tokens_per_s": 20.0,
        "ratio": 1.0,
        "note": "first",
        "ok": True,
        "rows": {"a": 3},
    }
    assert median_of([{"x": 1 / 3}, {"x": 1 / 3}], digits=2) == {"x": 0.33}


def test_stream_summary_puts_the_callers_fields_first():
    summary = stream_summary(40, 2.0, [0.1, 0.2, 0.3], concurrency=4, requests=8)
    assert list(summary) == [
        "concurrency",
        "requests",
        "tokens",
        "seconds",
        "tokens_per_s",
        "ttft_p50_s",
        "ttft_p95_s",
    ]
    assert summary["tokens_per_s"] == 20.0
    assert summary["ttft_p50_s"] == 0.2


def test_the_arrivals_workload_is_the_same_for_the_same_seed():
    assert workload(12, 3) == workload(12, 3)
    assert workload(12, 3) != workload(12, 4)
    assert {item["new_tokens"] for item in workload(40, 0, [4, 8])} <= {4, 8}
    times = arrival_times(20, 2.5, 0)
    assert times == arrival_times(20, 2.5, 0)
    assert times[0] == 0.0
    assert times == sorted(times)


@pytest.mark.parametrize("name", sorted(module.name for module in pkgutil.iter_modules(bench.__path__)))
def test_every_bench_module_imports(name):
    module = importlib.import_module(f"bench.{name}")
    assert module.__doc__
