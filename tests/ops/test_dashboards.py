"""The Grafana dashboards: generated from deploy/grafana/build_dashboards.py, every query valid PromQL,
and every metric a query names exported by a running server."""

import importlib.util
import json
import re
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.ops.conftest import ROOT, require, scrape

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


def metric_names(expr: str) -> set[str]:
    """Metric names of the vector selectors in a PromQL expression (parsed, not pattern-matched)."""
    promql = require("promql_parser")
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql.VectorSelector):
            names.add(node.name)

    promql.walk(promql.parse(expr), pre_visit=visit)
    return names


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


def test_every_metric_in_the_dashboards_is_exported(ops_client: httpx.Client) -> None:
    # traffic first, so that labelled series (rejections...) exist
    conv = "ops-dashboards"
    assert (
        ops_client.post(
            "/generate", json={"conversation_id": conv, "prompt": "hi", "max_tokens": 3}
        ).status_code
        == 200
    )
    assert (
        ops_client.post("/intrinsic/certainty", json={"conversation_id": conv, "max_tokens": 2}).status_code
        == 200
    )
    assert ops_client.post("/intrinsic/nope", json={"conversation_id": conv}).status_code == 404
    assert ops_client.delete(f"/conversations/{conv}").status_code == 204
    exported = set(scrape(ops_client).samples)

    used: dict[str, set[str]] = {}
    for name, dashboard in dashboards().items():
        for expr in queries(dashboard):
            for metric in metric_names(expr):
                used.setdefault(metric, set()).add(name)
        for variable in dashboard["templating"]["list"]:
            for metric in re.findall(r"label_values\((\w+)", json.dumps(variable.get("query", ""))):
                used.setdefault(metric, set()).add(name)
    missing = {metric: sorted(where) for metric, where in used.items() if metric not in exported}
    assert not missing, f"metrics named in dashboards but not exported: {missing}"
    assert len(used) >= 30  # the dashboards do look at the service's metrics
