"""Writes the Grafana dashboards (deploy/grafana/dashboards/*.json) from the compact spec below.

    python deploy/grafana/build_dashboards.py          (or `make dashboards`)

The JSON files are what docker-compose provisions and what the Helm chart ships as ConfigMaps (the
chart's dashboards/ links here); tests/ops checks they are up to date with this file and that every
metric their queries name is exported by a running server. Edit this file, not the JSON.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job=~"$job", instance=~"$instance"'  # every query's label filter
RATE = "$__rate_interval"
QUANTILES = (0.5, 0.9, 0.99)
FIVE_XX = 'status=~"5.."'


@dataclass
class Panel:
    title: str
    targets: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"  # or "stat"
    width: int = 8
    stack: bool = False


@dataclass
class Row:
    title: str
    panels: list[Panel] = field(default_factory=list)


def quantiles(metric: str, by: str, extra: str = "") -> list[tuple[str, str]]:
    """p50 / p90 / p99 of histogram `metric` per `by` label."""
    selector = f"{SEL}{', ' + extra if extra else ''}"
    return [
        (
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
            f"p{round(q * 100)} {{{{{by}}}}}",
        )
        for q in QUANTILES
    ]


def rate(metric: str, by: str = "", extra: str = "") -> str:
    selector = f"{SEL}{', ' + extra if extra else ''}"
    grouping = f" by ({by}) " if by else ""
    return f"sum{grouping}(rate({metric}{{{selector}}}[{RATE}]))"


OVERVIEW = [
    Row(
        "Traffic",
        [
            Panel(
                "Requests / s by endpoint",
                [(rate("alora_request_success_total", "endpoint"), "{{endpoint}}")],
                "reqps",
                "Finished requests (a fan-out call counts one per intrinsic).",
            ),
            Panel(
                "Rejected / s by status and reason",
                [
                    (
                        rate("alora_request_rejected_total", "endpoint, status, reason"),
                        "{{endpoint}} {{status}} {{reason}}",
                    )
                ],
                "reqps",
                "Error answers of /generate and /intrinsic(s): 429 overloaded, 413 too large, 404, 503...",
            ),
            Panel(
                "429 overloaded / s",
                [(rate("alora_request_rejected_total", "endpoint", 'status="429"'), "{{endpoint}}")],
                "reqps",
                "The engine's queue is full (--max-waiting): scale out, or clients back off (Retry-After).",
            ),
            Panel(
                "Error ratio",
                [
                    (
                        f"{rate('alora_request_rejected_total')} / "
                        f"({rate('alora_request_rejected_total')} + {rate('alora_request_success_total')})",
                        "rejected",
                    ),
                    (
                        f"{rate('alora_http_requests_total', extra=FIVE_XX)} / {rate('alora_http_requests_total')}",
                        "HTTP 5xx",
                    ),
                ],
                "percentunit",
                kind="stat",
            ),
            Panel(
                "HTTP requests / s by route and status",
                [(rate("alora_http_requests_total", "route, status"), "{{route}} {{status}}")],
                "reqps",
                width=16,
            ),
        ],
    ),
    Row(
        "Latency by endpoint",
        [
            Panel("Time to first token", quantiles("alora_time_to_first_token_seconds", "endpoint"), "s"),
            Panel("Inter-token latency", quantiles("alora_inter_token_latency_seconds", "endpoint"), "s"),
            Panel("End-to-end latency", quantiles("alora_e2e_request_latency_seconds", "endpoint"), "s"),
            Panel("Queue time", quantiles("alora_request_queue_time_seconds", "endpoint"), "s"),
            Panel("Prefill time", quantiles("alora_request_prefill_time_seconds", "endpoint"), "s"),
            Panel("Decode time", quantiles("alora_request_decode_time_seconds", "endpoint"), "s"),
        ],
    ),
    Row(
        "Throughput",
        [
            Panel(
                "Tokens / s",
                [
                    (rate("alora_prompt_tokens_total", "endpoint"), "prompt {{endpoint}}"),
                    (rate("alora_generation_tokens_total", "endpoint"), "generated {{endpoint}}"),
                    (rate("alora_prompt_tokens_cached_total", "endpoint"), "reused {{endpoint}}"),
                ],
                "short",
                "Prompt tokens include the reused ones: computed = prompt - reused.",
            ),
            Panel(
                "Prompt length",
                quantiles("alora_request_prompt_tokens", "endpoint"),
                "short",
            ),
            Panel(
                "Generated length",
                quantiles("alora_request_generation_tokens", "endpoint"),
                "short",
            ),
        ],
    ),
    Row(
        "Backpressure",
        [
            Panel(
                "Requests running / waiting",
                [
                    (f"sum by (instance) (alora_num_requests_running{{{SEL}}})", "running {{instance}}"),
                    (f"sum by (instance) (alora_num_requests_waiting{{{SEL}}})", "waiting {{instance}}"),
                ],
                "short",
                "Waiting > 0 for long: the replica is saturated (the HPA scales on it).",
            ),
            Panel(
                "KV pool usage",
                [(f"max by (instance) (alora_kv_cache_usage_perc{{{SEL}}})", "{{instance}}")],
                "percentunit",
            ),
            Panel(
                "Preemptions / s and in-flight HTTP requests",
                [
                    (rate("alora_num_preemptions_total", "instance"), "preemptions {{instance}}"),
                    (f"sum by (instance) (alora_http_requests_in_flight{{{SEL}}})", "in flight {{instance}}"),
                    (f"max by (instance) (alora_draining{{{SEL}}})", "draining {{instance}}"),
                ],
                "short",
            ),
        ],
    ),
]

KV_CACHE = [
    Row(
        "Tiers",
        [
            Panel(
                "Usage by tier",
                [
                    (f"sum by (tier) (alora_kv_cache_usage_bytes{{{SEL}}})", "used {{tier}}"),
                    (f"sum by (tier) (alora_kv_cache_capacity_bytes{{{SEL}}})", "capacity {{tier}}"),
                ],
                "bytes",
                "Device: KV held by conversations in the pool; host: the host tier (pinned on CUDA).",
            ),
            Panel(
                "Prefix hit rate by tier",
                [
                    (
                        f"{rate('alora_prefix_cache_hits_total', 'tier')} "
                        f"/ ignoring (tier) group_left {rate('alora_prefix_cache_queries_total')}",
                        "{{tier}}",
                    ),
                ],
                "percentunit",
                "Prompt tokens reused from each tier / prompt tokens of requests on a conversation.",
                stack=True,
            ),
            Panel(
                "Reused and recomputed tokens / s",
                [
                    (rate("alora_prompt_tokens_cached_total", "endpoint"), "reused {{endpoint}}"),
                    (rate("alora_prefix_cache_recomputed_tokens_total"), "recomputed (cheaper than restore)"),
                ],
                "short",
            ),
        ],
    ),
    Row(
        "Movement",
        [
            Panel(
                "Evicted blocks / s",
                [
                    (
                        rate("alora_kv_cache_evicted_blocks_total", "tier, destination"),
                        "{{tier}} -> {{destination}}",
                    )
                ],
                "short",
                "Idle conversations demoted under the byte budgets; `dropped` means no lower tier kept them.",
            ),
            Panel(
                "Promoted blocks / s",
                [(rate("alora_kv_cache_promoted_blocks_total", "tier"), "from {{tier}}")],
                "short",
            ),
            Panel(
                "Transfer latency (mean per transfer)",
                [
                    (
                        f"{rate('alora_kv_cache_transfer_seconds_total', 'direction')} "
                        f"/ {rate('alora_kv_cache_transfers_total', 'direction')}",
                        "{{direction}}",
                    )
                ],
                "s",
            ),
            Panel(
                "Transfer throughput",
                [(rate("alora_kv_cache_transfer_bytes_total", "direction"), "{{direction}}")],
                "Bps",
            ),
        ],
    ),
    Row(
        "Redis",
        [
            Panel(
                "Redis errors and skipped writes / s",
                [
                    (rate("alora_redis_errors_total", "instance"), "errors {{instance}}"),
                    (rate("alora_redis_writes_skipped_total", "instance"), "writes skipped {{instance}}"),
                    (rate("alora_redis_discarded_entries_total", "reason"), "discarded: {{reason}}"),
                ],
                "short",
            ),
            Panel(
                "Redis errors by kind / s",
                [(rate("alora_redis_errors_total", "kind"), "{{kind}}")],
                "short",
                "moved / ask: redirections (followed; a burst = resharding or a failover), timeout, "
                "connection, cluster_down: a node or the cluster unreachable (its keys recomputed).",
            ),
            Panel(
                "Redis round trip by node",
                [
                    (
                        f"histogram_quantile({q}, sum by (le, node) "
                        f"(rate(alora_redis_node_latency_seconds_bucket{{{SEL}}}[{RATE}])))",
                        f"p{round(q * 100)} {{{{node}}}}",
                    )
                    for q in (0.5, 0.99)
                ],
                "s",
                "One command or pipeline to a Redis node (a Cluster master, or sentinel:<set>), send to "
                "last reply, over every replica.",
            ),
            Panel(
                "Redis degraded (1 = unreachable, recomputing)",
                [(f"max by (instance) (alora_redis_degraded{{{SEL}}})", "{{instance}}")],
                "short",
            ),
            Panel(
                "Bytes waiting to be written to Redis",
                [(f"sum by (instance) (alora_redis_pending_write_bytes{{{SEL}}})", "{{instance}}")],
                "bytes",
            ),
        ],
    ),
]

ADAPTER = 'adapter=~"$adapter"'
ADAPTERS = [
    Row(
        "Per adapter",
        [
            Panel(
                "Requests / s by adapter",
                [(rate("alora_request_success_total", "adapter", ADAPTER), "{{adapter}}")],
                "reqps",
            ),
            Panel(
                "Time to first token by adapter",
                quantiles("alora_time_to_first_token_seconds", "adapter", ADAPTER),
                "s",
            ),
            Panel(
                "Inter-token latency by adapter",
                quantiles("alora_inter_token_latency_seconds", "adapter", ADAPTER),
                "s",
            ),
            Panel(
                "End-to-end latency by adapter",
                quantiles("alora_e2e_request_latency_seconds", "adapter", ADAPTER),
                "s",
            ),
            Panel(
                "Reused share of prompt tokens by adapter",
                [
                    (
                        f"{rate('alora_prompt_tokens_cached_total', 'adapter', ADAPTER)} "
                        f"/ {rate('alora_prompt_tokens_total', 'adapter', ADAPTER)}",
                        "{{adapter}}",
                    )
                ],
                "percentunit",
                "An aLoRA reuses the conversation's KV up to its invocation; a plain LoRA reuses nothing.",
            ),
            Panel(
                "Tokens / s by adapter",
                [
                    (rate("alora_prompt_tokens_total", "adapter", ADAPTER), "prompt {{adapter}}"),
                    (rate("alora_generation_tokens_total", "adapter", ADAPTER), "generated {{adapter}}"),
                ],
                "short",
            ),
            Panel(
                "Finish reasons / s",
                [
                    (
                        rate("alora_request_success_total", "adapter, finished_reason", ADAPTER),
                        "{{adapter}} {{finished_reason}}",
                    )
                ],
                "reqps",
            ),
            Panel(
                "Loaded adapters",
                [
                    (
                        f"max by (adapter, kind, rank) (alora_adapter_info{{{SEL}}})",
                        "{{adapter}} ({{kind}}, rank {{rank}})",
                    )
                ],
                "short",
                kind="stat",
                width=16,
            ),
        ],
    )
]


def variable(name: str, query: str, include_all: bool = True) -> dict[str, Any]:
    return {
        "name": name,
        "label": name,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-var"},
        "definition": query,
        "refresh": 2,
        "includeAll": include_all,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.kind == "timeseries":
        defaults["custom"] = {"stacking": {"mode": "normal" if panel.stack else "none"}, "fillOpacity": 10}
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(panel.targets)
        ],
    }


def dashboard(
    uid: str, title: str, description: str, rows: list[Row], adapter_var: bool = False
) -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    panel_id = 1
    for row in rows:
        panels.append(
            {
                "id": panel_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        panel_id += 1
        y += 1
        x = 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y = 0, y + 8
            panels.append(panel_json(panel, panel_id, x, y))
            panel_id += 1
            x += panel.width
        y += 8
    variables = [
        {
            "name": "datasource",
            "label": "Prometheus",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
        },
        variable("job", "label_values(alora_build_info, job)"),
        variable("instance", 'label_values(alora_build_info{job=~"$job"}, instance)'),
    ]
    if adapter_var:
        variables.append(variable("adapter", 'label_values(alora_adapter_info{job=~"$job"}, adapter)'))
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["alora-serve"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "browser",
        "graphTooltip": 1,
        "templating": {"list": variables},
        "annotations": {"list": []},
        "links": [
            {"type": "dashboards", "tags": ["alora-serve"], "title": "alora-serve", "asDropdown": True}
        ],
        "panels": panels,
    }


def render() -> dict[str, dict[str, Any]]:
    """File name -> dashboard JSON model."""
    return {
        "alora-serve-overview.json": dashboard(
            "alora-serve-overview",
            "alora-serve / Overview",
            "Traffic, errors and 429s, latency by endpoint, throughput, backpressure.",
            OVERVIEW,
        ),
        "alora-serve-kv-cache.json": dashboard(
            "alora-serve-kv-cache",
            "alora-serve / KV cache tiers",
            "Conversation caches across device, host and Redis: usage, hit rate, evictions, transfers.",
            KV_CACHE,
        ),
        "alora-serve-adapters.json": dashboard(
            "alora-serve-adapters",
            "alora-serve / Adapters",
            "Per adapter (intrinsic): traffic, latency, KV reuse.",
            ADAPTERS,
            adapter_var=True,
        ),
    }


def dumps(model: dict[str, Any]) -> str:
    return json.dumps(model, indent=2, sort_keys=True) + "\n"


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, model in render().items():
        (OUT / name).write_text(dumps(model))
        print(f"wrote {OUT / name}")


if __name__ == "__main__":
    main()
