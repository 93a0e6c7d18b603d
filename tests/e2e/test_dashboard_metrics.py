"""The Grafana dashboard (deploy/grafana/mmserve.json) and the Prometheus alert rules
(deploy/prometheus/alerts.yml) are well formed, and every metric their queries name is in
the /metrics of a running `mmserve serve` (a tiny random model) once it has answered requests."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.serving import ServeProcess
from bench.sse import read_stream

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "mmserve.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

READY_TIMEOUT = 120.0
SAMPLES_TIMEOUT = 20.0  # workers publish their counters with their heartbeat (every 2 s)

# -- reading metric names out of PromQL -------------------------------------------------

# fmt: off
AGGREGATIONS = frozenset({
    "avg", "bottomk", "count", "count_values", "group", "limit_ratio", "limitk", "max", "min", "quantile",
    "stddev", "stdvar", "sum", "topk",
})
FUNCTIONS = frozenset({
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh",
    "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh",
    "count_over_time", "day_of_month", "day_of_week", "day_of_year", "days_in_month", "deg", "delta",
    "deriv", "double_exponential_smoothing", "exp", "floor", "histogram_avg", "histogram_count",
    "histogram_fraction", "histogram_quantile", "histogram_stddev", "histogram_stdvar", "histogram_sum",
    "holt_winters", "hour", "idelta", "increase", "irate", "label_join", "label_replace",
    "last_over_time", "ln", "log10", "log2", "mad_over_time", "max_over_time", "min_over_time", "minute",
    "month", "pi", "predict_linear", "present_over_time", "quantile_over_time", "rad", "rate", "resets",
    "round", "scalar", "sgn", "sin", "sinh", "sort", "sort_by_label", "sort_by_label_desc", "sort_desc",
    "sqrt", "stddev_over_time", "stdvar_over_time", "sum_over_time", "tan", "tanh", "time", "timestamp",
    "vector", "year",
})
GROUPING = frozenset({
    "by", "group_left", "group_right", "ignoring", "on", "without",
})
KEYWORDS = frozenset({
    "and", "atan2", "bool", "end", "inf", "le", "nan", "offset", "or", "start", "unless",
})
# fmt: on

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+)(?![\w.])
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<variable>\$\{\w+(?::\w+)?\}|\$\w+)
  | (?P<punct>[{}(),])
  | (?P<operator>==|!=|>=|<=|=~|!~|[-+*/%^<>=@])
    """,
    re.VERBOSE,
)
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def tokens(expr: str) -> list[tuple[str, str]]:
    """(kind, text) of every PromQL token of `expr` but spaces; strings and range brackets are one token."""
    found = []
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"cannot read PromQL at {expr[position : position + 20]!r} in {expr!r}")
        if match.lastgroup != "space":
            found.append((match.lastgroup, match.group()))
        position = match.end()
    return found


def _after_closing(found: list[tuple[str, str]], start: int, opening: str, closing: str) -> int:
    """Index just past the token closing the bracket opened at `start`."""
    depth = 0
    for index in range(start, len(found)):
        text = found[index][1]
        depth += text == opening
        depth -= text == closing
        if depth == 0:
            return index + 1
    raise ValueError(f"unbalanced {opening}{closing} in {' '.join(text for _, text in found)!r}")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions,
    aggregations or keywords, leaving out label names in {...} and in by/without/on/... (...)."""
    found = tokens(expr)
    names: set[str] = set()
    index = 0
    while index < len(found):
        kind, text = found[index]
        following = found[index + 1][1] if index + 1 < len(found) else ""
        if text == "{":  # label matchers of a selector
            index = _after_closing(found, index, "{", "}")
            continue
        if kind == "name":
            word = text.lower()
            if word in GROUPING:
                if following == "(":
                    index = _after_closing(found, index + 1, "(", ")")
                    continue
            elif word in AGGREGATIONS or word in FUNCTIONS or word in KEYWORDS:
                pass
            elif following == "(":
                raise ValueError(f"{text}( is not a PromQL function, in {expr!r}")
            else:
                names.add(text)
        index += 1
    return names


def variables(expr: str) -> set[str]:
    """Grafana variables ($name or ${name}) an expression uses."""
    return {braced or bare for braced, bare in _VARIABLE.findall(expr)}


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        (
            'histogram_quantile(0.95, sum by (consumer_group, le) (rate(m_seconds_bucket{a=~"$g"}[5m])))',
            {"m_seconds_bucket"},
        ),
        (
            "sum(rate(a_total[1h30m] offset 5m)) / sum without (le) (b_count) > bool 0.05",
            {"a_total", "b_count"},
        ),
        (
            'x == 0 and on (consumer_group) max(y) by (route) > 1e-3 unless absent(z{k="by (q)"})',
            {"x", "y", "z"},
        ),
        ('label_replace(up, "dst", "$1", "src", "(.*)") * ignoring(job) group_left(on) w', {"up", "w"}),
        ('count_values("v", q) + topk(3, r) or vector(0) + node:cpu:rate5m', {"q", "r", "node:cpu:rate5m"}),
    ],
)
def test_the_promql_reader_finds_only_metric_names(expr, expected):
    assert metric_names(expr) == expected


def test_the_promql_reader_refuses_an_unknown_function():
    with pytest.raises(ValueError, match="not a PromQL function"):
        metric_names("sum(rates(a_total[5m]))")


# -- the files ----------------------------------------------------------------------------


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))  # a collapsed row keeps its panels inside


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable naming a metric."""
    queries = [
        (f"panel {panel['title']!r} target {target.get('refId')}", target["expr"])
        for panel in all_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        selector = re.fullmatch(r"\s*label_values\((.+),\s*\w+\s*\)\s*", query)
        if selector is not None:
            queries.append((f"variable {variable['name']!r}", selector.group(1)))
    return queries


def load_rules() -> list[dict]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_the_dashboard_is_a_grafana_model_whose_panels_all_query():
    dashboard = load_dashboard()
    assert dashboard["title"] and dashboard["uid"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    defined = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert defined["datasource"]["type"] == "datasource"
    assert defined["datasource"]["query"] == "prometheus"
    assert defined["consumer_group"]["type"] == "query"
    assert defined["consumer_group"]["datasource"]["uid"] == "${datasource}"

    panels = [panel for panel in all_panels(dashboard["panels"]) if panel["type"] != "row"]
    assert panels
    ids = [panel["id"] for panel in all_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), f"panel {panel['title']!r}: empty query"
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    refs = [(panel["title"], target["refId"]) for panel in panels for target in panel["targets"]]
    assert len(refs) == len(set(refs)), "a panel repeats a refId"

    for where, expr in dashboard_queries(dashboard):
        undefined = {name for name in variables(expr) if not name.startswith("__")} - set(defined)
        assert not undefined, f"{where} uses undefined variables {undefined}"
        assert metric_names(expr), f"{where} selects no metric: {expr!r}"


def test_every_alert_rule_is_complete():
    rules = load_rules()
    assert rules
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names repeat"
    for rule in rules:
        assert rule["alert"] and rule["expr"].strip(), rule
        assert re.fullmatch(r"(?:\d+(?:ms|[smhdwy]))+", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
        assert metric_names(rule["expr"]), rule["alert"]


# -- against a running server -------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory) -> Iterator[ServeProcess]:
    root = tmp_path_factory.mktemp("serve-metrics")
    serve = ServeProcess.tiny(
        tiny_model_dir,
        "--log-level",
        "WARNING",
        log_path=root / "serve.log",
    )
    try:
        serve.wait_ready(READY_TIMEOUT)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield serve
    serve.stop()


def exposed_samples(url: str) -> set[str]:
    """Names of the samples in one scrape of `url`/metrics (counters as <name>_total,
    histograms as <name>_bucket/_sum/_count, as Prometheus stores them)."""
    response = requests.get(url + "/metrics", timeout=10)
    assert response.status_code == 200, response.text
    families = text_string_to_metric_families(response.text)
    return {sample.name for family in families for sample in family.samples}


def test_every_metric_the_dashboard_and_alerts_use_is_served(served):
    used: dict[str, set[str]] = {}
    for where, expr in dashboard_queries(load_dashboard()):
        for name in metric_names(expr):
            used.setdefault(name, set()).add(f"dashboard {where}")
    for rule in load_rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")

    # Labelled series only appear once something happened: a token streamed and one not,
    # an error (unknown consumer group: 404), then the worker's next heartbeat.
    payload = {"text": "Tell me about the sea.", "max_new_tokens": 4}
    assert requests.post(served.url + "/generate", json=payload, timeout=60).status_code == 200
    with requests.post(served.url + "/generate_stream", json=payload, stream=True, timeout=60) as stream:
        assert any(event.event == "message" for event in read_stream(stream))
    stranger = {**payload, "consumer_group": "nobody"}
    assert requests.post(served.url + "/generate", json=stranger, timeout=30).status_code == 404

    deadline = time.monotonic() + SAMPLES_TIMEOUT
    while True:
        served_names = exposed_samples(served.url)
        missing = {name: sorted(where) for name, where in used.items() if name not in served_names}
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, f"not in /metrics: {missing}\nserved: {sorted(served_names)}"

    # /metrics answers on every port; the management port serves the same families.
    management_names = exposed_samples(served.management_url)
    assert set(used) <= management_names
