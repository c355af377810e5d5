"""Prometheus metrics of one app instance (own registry, so several apps can live in one process).
Exported as text at GET /metrics; the operations release adds cache and batching metrics."""

from prometheus_client import CollectorRegistry, Counter, Gauge

from alora_core import GenerationResult


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "alora_http_requests",
            "HTTP requests by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "alora_http_requests_in_flight", "HTTP requests being served now.", registry=self.registry
        )
        self.tokens = Counter(
            "alora_tokens",
            "Tokens by endpoint (generate, intrinsic) and kind (prompt, cached, completion).",
            ["endpoint", "kind"],
            registry=self.registry,
        )
        self.draining = Gauge(
            "alora_draining", "1 after SIGTERM, while in-flight requests finish.", registry=self.registry
        )

    def record(self, endpoint: str, result: GenerationResult) -> None:
        self.tokens.labels(endpoint, "prompt").inc(result.usage.prompt_tokens)
        self.tokens.labels(endpoint, "cached").inc(result.usage.cached_tokens)
        self.tokens.labels(endpoint, "completion").inc(result.usage.completion_tokens)
