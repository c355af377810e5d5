"""The Grafana dashboards: generated from deploy/grafana/build_dashboards.py, every query valid PromQL,
and every metric a query names exported by a running server."""

import importlib.util
import json
import re
from types import ModuleType
from typing import Any

import pytest

from tests.ops.conftest import ROOT, ops_client_of, require, scrape
from tests.service.conftest import ServerProcess

DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
# Grafana's variables, replaced by values that make each query plain PromQL
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$job": ".*", "$instance": ".*", "$adapter": ".*"}


def builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_dashboards", ROOT / "deploy/grafana/build_dashboards.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def queries(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


Matcher = tuple[str, str, str]  # (label, op, value), op one of = != =~ !~


def selectors(expr: str) -> list[tuple[str, list[Matcher]]]:
    """The vector selectors of a PromQL expression (parsed, not pattern-matched): metric name and
    label matchers, Grafana's variables replaced by values that match anything."""
    promql = require("promql_parser")
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    ops = {"MatchOp.Equal": "=", "MatchOp.NotEqual": "!=", "MatchOp.Re": "=~", "MatchOp.NotRe": "!~"}
    found: list[tuple[str, list[Matcher]]] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql.VectorSelector):
            found.append((node.name, [(m.name, ops[str(m.op)], m.value) for m in node.matchers.matchers]))

    promql.walk(promql.parse(expr), pre_visit=visit)
    return found


def metric_names(expr: str) -> set[str]:
    return {name for name, _ in selectors(expr)}


def matches(labels: dict[str, str], matchers: list[Matcher]) -> bool:
    """Prometheus's semantics: a missing label (job and instance: Prometheus adds them) reads as ""."""
    for label, op, value in matchers:
        actual = labels.get(label, "")
        hit = actual == value if op in ("=", "!=") else re.fullmatch(value, actual) is not None
        if hit != (op in ("=", "=~")):
            return False
    return True


def test_dashboards_are_what_the_builder_writes() -> None:
    module = builder()
    expected = {name: module.dumps(model) for name, model in module.render().items()}
    actual = {path.name: path.read_text() for path in DASHBOARDS.glob("*.json")}
    assert actual == expected, "stale dashboards: run `make dashboards`"


def test_dashboards_cover_the_operations_views() -> None:
    titles = {
        name: [p["title"] for p in d["panels"] if p["type"] != "row"]
        + [p["title"] for p in d["panels"] if p["type"] == "row"]
        for name, d in dashboards().items()
    }
    overview = " | ".join(titles["alora-serve-overview.json"])
    for word in (
        "Requests / s",
        "429",
        "Time to first token",
        "Inter-token",
        "End-to-end",
        "Tokens / s",
        "running / waiting",
    ):
        assert word in overview, word
    kv = " | ".join(titles["alora-serve-kv-cache.json"])
    for word in ("Usage by tier", "hit rate", "Evicted", "Transfer latency", "Reused", "Redis"):
        assert word in kv, word
    adapters = dashboards()["alora-serve-adapters.json"]
    assert "adapter" in {v["name"] for v in adapters["templating"]["list"]}
    all_queries = [q for d in dashboards().values() for q in queries(d)]
    for quantile in ("0.5", "0.9", "0.99"):
        assert any(q.startswith(f"histogram_quantile({quantile}, sum by (le, endpoint)") for q in all_queries)
        assert any(q.startswith(f"histogram_quantile({quantile}, sum by (le, adapter)") for q in all_queries)


@pytest.mark.parametrize("name", sorted(p.name for p in DASHBOARDS.glob("*.json")))
def test_dashboard_is_well_formed(name: str) -> None:
    dashboard = dashboards()[name]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] == name.removesuffix(".json")
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for expr in queries(dashboard):
        assert metric_names(expr), expr  # parses, and names at least one metric


def test_every_metric_in_the_dashboards_is_exported(fresh_ops_server: ServerProcess) -> None:
    """Right after start-up, before any request: labelled counters (rejections by reason, finish
    reasons, tiers...) are exported as 0, so no panel shows "No data"."""
    with ops_client_of(fresh_ops_server) as client:
        fresh = scrape(client)
    assert fresh.value("alora_http_requests_total", route="/generate") == 0  # nothing served yet
    assert fresh.value("alora_request_success_total") == 0

    used: dict[str, set[str]] = {}
    unmatched: dict[str, set[str]] = {}
    for name, dashboard in dashboards().items():
        for expr in queries(dashboard):
            for metric, matchers in selectors(expr):
                used.setdefault(metric, set()).add(name)
                if not any(matches(s.labels, matchers) for s in fresh.samples.get(metric, [])):
                    unmatched.setdefault(f"{metric}{matchers}", set()).add(name)
        for variable in dashboard["templating"]["list"]:
            for metric in re.findall(r"label_values\((\w+)", json.dumps(variable.get("query", ""))):
                used.setdefault(metric, set()).add(name)
                if metric not in fresh.samples:
                    unmatched.setdefault(metric, set()).add(name)
    assert not unmatched, f"queries of the dashboards that select no exported series: {unmatched}"
    assert len(used) >= 30  # the dashboards do look at the service's metrics
