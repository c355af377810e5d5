"""Prometheus metrics of one app instance (own registry, so several apps can live in one process),
exported as text at GET /metrics. Names are vLLM's with our prefix (`vllm:time_to_first_token_seconds`
-> `alora_time_to_first_token_seconds`) so its PromQL carries over; values are in base units.

    per request  (routes: record(endpoint, result))    latency and token histograms, token counters
    per response (middleware: record_http(...))        HTTP counts, rejections by status and code
    per step     (scheduler thread: InterTokenTimer)   inter-token latency
    per scrape   (EngineCollector, reads the engine)   running / waiting, KV pool and tiers, Redis

Labels stay bounded: `endpoint` (generate | intrinsic | chat | completion), `adapter` (a loaded adapter,
`base` for none), `tier`, `kind` (base | alora | lora; Redis error kinds), `finished_reason`, `status`
and `reason` (error codes, eviction reasons), `node` (the Redis deployment's masters). Never a
conversation id or API key.
"""

import json
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from alora_core import Engine, GenerationResult
from alora_core.kvcache.redis_health import ERROR_KINDS, NODE_LATENCY_BUCKETS
from alora_core.sequence import Sequence
from alora_core.step import Work
from service import package_version

BASE = "base"  # the adapter label of base-model requests
OPENAI_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
UNKNOWN = "unknown"  # a label value that cannot be read (an error code, an adapter slot)

# Label values known before the first request. Their series are created at start-up (`preset`), so a
# counter exports 0 from the first scrape, as vLLM's do, and a dashboard panel shows 0, not "No data".
# A new label value (an endpoint, an error code...) is added here; adapters come with the engine (bind).
ENDPOINTS = ("generate", "intrinsic", "chat", "completion")
FINISH_REASONS = ("stop", "length")
REJECTIONS = (  # (status, error code) an engine endpoint can answer (service/errors.py, alora_core/errors.py)
    ("400", "invalid_request"),
    ("401", "unauthorized"),
    ("404", "not_found"),
    ("404", "unknown_adapter"),
    ("404", "unknown_conversation"),
    ("404", "model_not_found"),
    ("405", "method_not_allowed"),
    ("409", "conversation_busy"),
    ("413", "request_too_large"),
    ("413", "context_too_long"),
    ("422", "invocation_missing"),
    ("429", "overloaded"),
    ("499", "cancelled"),
    ("499", "client_closed_request"),
    ("500", "internal_error"),
    ("503", "kv_cache_exhausted"),
    ("503", "cache_unavailable"),
)
HTTP_PRESET_STATUS = "500"  # every route's HTTP counter starts with this status (the 5xx panels)
TIERS = ("device", "host", "redis")
# (tier, destination) of evicted blocks, and transfer directions, always exported (0 until seen)
EVICTIONS = (
    ("device", "host"),
    ("device", "redis"),
    ("host", "redis"),
    ("device", "dropped"),
    ("host", "dropped"),
)
TRANSFERS = ("device->host", "host->device", "redis->device", "to_redis")
DISCARD_REASONS = ("missing", "corrupt", "stale")  # of Redis values refused (the codec may add more)
ADAPTER_KINDS = ("base", "alora", "lora")  # prefix-cache hit rate by the kind of request
INDEX_TIERS = ("device", "host")  # where the KV index's blocks lie (Redis is shared by replicas)
EVICTION_REASONS = ("pressure", "budget", "deleted")  # room needed / device budget / DELETE

# buckets (seconds, tokens): intrinsics take milliseconds, long conversations' turns minutes
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)  # fmt: skip
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
               0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)  # fmt: skip
E2E_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
               50.0, 60.0, 120.0, 240.0, 480.0, 960.0)  # fmt: skip
TOKEN_BUCKETS = tuple(m * 10**e for e in range(6) for m in (1, 2, 5))  # 1, 2, 5, 10, ... 500000

disable_created_metrics()  # no `*_created` series: Prometheus does not need them, readers trip on them


MetricT = TypeVar("MetricT", Counter, Histogram)


def preset(metric: MetricT, label_sets: Iterable[tuple[str, ...]]) -> MetricT:
    """Create `metric`'s series for each known set of label values now: exported as 0 until they move."""
    for labels in label_sets:
        metric.labels(*labels)
    return metric


def endpoint_of(path: str) -> str | None:
    """The engine endpoint a request path belongs to (None: not an engine endpoint)."""
    if path == "/generate":
        return "generate"
    if path.startswith("/intrinsic/") or path == "/intrinsics":
        return "intrinsic"
    return OPENAI_ENDPOINTS.get(path)


def error_code_of(body: bytes) -> str:
    """The `code` of an error body ({"error": {"code": ...}}); codes are a fixed set of names."""
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return UNKNOWN
    return code if isinstance(code, str) and len(code) <= 64 else UNKNOWN


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "alora_http_requests",
            "HTTP requests by method, route template and status code.",
            ["method", "route", "status"],
            registry=r,
        )
        self.in_flight = Gauge("alora_http_requests_in_flight", "HTTP requests being served now.", registry=r)
        self.draining = Gauge(
            "alora_draining", "1 after SIGTERM, while in-flight requests finish.", registry=r
        )
        self.rejected = preset(
            Counter(
                "alora_request_rejected",
                "Requests to /generate and /intrinsic answered with an error, by status and error code.",
                ["endpoint", "status", "reason"],
                registry=r,
            ),
            [(endpoint, *rejection) for endpoint in ENDPOINTS for rejection in REJECTIONS],
        )

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, ["endpoint", "adapter"], buckets=buckets, registry=r)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, ["endpoint", "adapter"], registry=r)

        self.ttft = histogram(
            "alora_time_to_first_token_seconds", "Arrival in the engine -> first token.", LATENCY_BUCKETS
        )
        self.itl = histogram(
            "alora_inter_token_latency_seconds", "Time between two tokens of a request.", ITL_BUCKETS
        )
        self.e2e = histogram("alora_e2e_request_latency_seconds", "Arrival -> last token.", E2E_BUCKETS)
        self.queue = histogram(
            "alora_request_queue_time_seconds", "Arrival -> admitted to a batch.", LATENCY_BUCKETS
        )
        self.prefill = histogram(
            "alora_request_prefill_time_seconds", "Admitted -> first token.", LATENCY_BUCKETS
        )
        self.decode = histogram("alora_request_decode_time_seconds", "First -> last token.", E2E_BUCKETS)
        self.prompt_len = histogram(
            "alora_request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS
        )
        self.generation_len = histogram(
            "alora_request_generation_tokens", "Generated tokens per request.", TOKEN_BUCKETS
        )
        self.prompt_tokens = counter("alora_prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("alora_generation_tokens", "Generated tokens.")
        self.cached_tokens = counter(
            "alora_prompt_tokens_cached", "Prompt tokens whose KV was reused from the conversation."
        )
        self.success = Counter(
            "alora_request_success",
            "Finished requests by finish reason (stop: end of text or a stop string; length).",
            ["endpoint", "adapter", "finished_reason"],
            registry=r,
        )
        self.build = Info("alora_build", "Versions of the service and its runtime.", registry=r)
        self.build.info(
            {
                "version": package_version(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "cuda": torch.version.cuda or "none",
            }
        )
        self.model = Info("alora_model", "The served model and its KV cache layout.", registry=r)

    def bind(self, engine: Engine, model_name: str) -> None:
        """Once the engine is loaded: export its state, time its steps, create the series of every
        loaded adapter (so rate() works from the first request)."""
        self.model.info(
            {
                "model": model_name,
                "dtype": str(engine.loaded.dtype).removeprefix("torch."),
                "device": str(engine.loaded.device),
                "block_size": str(engine.pool.block_size),
                "max_model_len": str(engine.max_model_len),
            }
        )
        self.registry.register(EngineCollector(engine))
        engine.scheduler.step_observers.append(InterTokenTimer(engine, self.itl))
        names = [a.spec.name for a in engine.adapters.all()]
        pairs = [("generate", BASE)] + [("intrinsic", name) for name in names]
        pairs += [(endpoint, name) for endpoint in OPENAI_ENDPOINTS.values() for name in (BASE, *names)]
        per_request: list[Histogram | Counter] = [
            self.ttft, self.itl, self.e2e, self.queue, self.prefill, self.decode, self.prompt_len,
            self.generation_len, self.prompt_tokens, self.generation_tokens, self.cached_tokens,
        ]  # fmt: skip
        for family in per_request:
            preset(family, pairs)
        preset(self.success, [(*labels, reason) for labels in pairs for reason in FINISH_REASONS])

    def bind_routes(self, routes: Iterable[tuple[str, str]]) -> None:
        """Once the app's routes are known ((method, route template) pairs): their HTTP counters."""
        preset(self.requests, [(method, route, HTTP_PRESET_STATUS) for method, route in routes])

    def record(self, endpoint: str, result: GenerationResult, count_prompt: bool = True) -> None:
        """A finished request (called by its route, once per result). count_prompt=False: another
        choice of an n-choice request, whose prompt was counted with its first choice."""
        labels = (endpoint, result.adapter or BASE)
        usage = result.usage
        self.ttft.labels(*labels).observe(result.ttft_s)
        self.e2e.labels(*labels).observe(result.total_s)
        self.queue.labels(*labels).observe(result.queue_s)
        self.prefill.labels(*labels).observe(max(0.0, result.ttft_s - result.queue_s))
        self.decode.labels(*labels).observe(max(0.0, result.total_s - result.ttft_s))
        self.generation_len.labels(*labels).observe(usage.completion_tokens)
        self.generation_tokens.labels(*labels).inc(usage.completion_tokens)
        if count_prompt:
            self.prompt_len.labels(*labels).observe(usage.prompt_tokens)
            self.prompt_tokens.labels(*labels).inc(usage.prompt_tokens)
            self.cached_tokens.labels(*labels).inc(usage.cached_tokens)
        self.success.labels(*labels, result.finish_reason).inc()

    def record_http(self, method: str, route: str, path: str, status: int, error_body: bytes) -> None:
        """A response sent (called by the middleware): error_body is the start of an error's body."""
        self.requests.labels(method, route, str(status)).inc()
        endpoint = endpoint_of(path)
        if status >= 400 and endpoint is not None:
            self.rejected.labels(endpoint, str(status), error_code_of(error_body)).inc()


class InterTokenTimer:
    """A scheduler step observer (scheduler thread, before each forward, work = [(seq, start, end)]).

    A decode step feeds a sequence's last sampled token and yields its next one; the time since the
    sequence's previous step is one inter-token interval:
        step k   (t_k): ... -> token n          step k+1 (t_k+1): feed token n -> token n+1
        observe t_k+1 - t_k
    """

    STALE_S = 300.0  # a sequence out of the batch this long (preempted, cancelled) is forgotten

    def __init__(self, engine: Engine, histogram: Histogram) -> None:
        self._engine = engine
        self._histogram = histogram
        self._last: dict[int, tuple[Sequence, float]] = {}  # id(seq) -> (seq, start of its last step)

    def __call__(self, work: list[Work]) -> None:
        now = time.perf_counter()
        names: dict[int, str] | None = None
        last: dict[int, tuple[Sequence, float]] = {}
        for seq, start, end in work:
            previous = self._last.get(id(seq))
            if previous is not None and previous[0] is seq and _is_decode(seq, start, end):
                if seq.adapter_slot is None:
                    labels = ("generate", BASE)
                else:
                    if names is None:
                        names = {a.slot: a.spec.name for a in self._engine.adapters.all()}
                    labels = ("intrinsic", names.get(seq.adapter_slot, UNKNOWN))
                self._histogram.labels(*labels).observe(now - previous[1])
            last[id(seq)] = (seq, now)
        for key, (seq, seen) in self._last.items():  # not in this step: keep those that may come back
            if key not in last and not seq.finished and now - seen < self.STALE_S:
                last[key] = (seq, seen)
        self._last = last  # finished sequences are dropped at once (no reference kept to them)


def _is_decode(seq: Sequence, start: int, end: int) -> bool:
    return end - start == 1 and end == seq.num_tokens and bool(seq.output)


class EngineCollector(Collector):
    """Reads the engine's state at scrape time (the cache stats take the scheduler's lock for a
    moment: /metrics runs on a worker thread, never on the event loop)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self._engine
        scheduler = engine.scheduler
        yield _gauge("alora_num_requests_running", "Requests in the running batch.", len(scheduler.running))
        yield _gauge("alora_num_requests_waiting", "Requests queued for admission.", scheduler.num_waiting)
        yield _counter(
            "alora_num_preemptions", "Requests preempted (KV full), to be recomputed.", scheduler.preemptions
        )
        pool = engine.pool
        yield _gauge(
            "alora_kv_cache_usage_perc",
            "Fraction of the device KV pool's blocks in use (0-1).",
            1.0 - pool.num_free / max(1, pool.num_blocks),
        )
        kinds = GaugeMetricFamily("alora_adapters_loaded", "Loaded adapters by kind.", labels=["kind"])
        info = GaugeMetricFamily(
            "alora_adapter_info",
            "One series per loaded adapter (value 1).",
            labels=["adapter", "kind", "rank"],
        )
        adapters = engine.adapters.all()
        for kind in ("alora", "lora"):
            kinds.add_metric([kind], sum(a.spec.kind == kind for a in adapters))
        for a in adapters:
            info.add_metric([a.spec.name, a.spec.kind, str(a.spec.rank)], 1)
        yield kinds
        yield info
        cache_stats = getattr(engine, "cache_stats", None)
        if cache_stats is not None:  # tiered caches (alora_core.kvcache.stats)
            yield from _cache_metrics(cache_stats(), pool.kv.numel() * pool.kv.element_size())


def _cache_metrics(stats: Any, pool_bytes: int) -> Iterator[Metric]:
    """Metrics of a kvcache.stats.CacheStats snapshot; fields are read defensively (0 when absent),
    as the tiered cache is still growing."""

    def field(name: str, default: Any = 0) -> Any:
        return getattr(stats, name, default)

    usage = GaugeMetricFamily(
        "alora_kv_cache_usage_bytes",
        "KV bytes held, by tier (device: in use by requests and conversations; host: cached).",
        labels=["tier"],
    )
    usage.add_metric(["device"], field("device_bytes"))
    usage.add_metric(["host"], field("host_bytes"))
    yield usage
    capacity = GaugeMetricFamily("alora_kv_cache_capacity_bytes", "Size of each tier.", labels=["tier"])
    capacity.add_metric(["device"], pool_bytes)
    capacity.add_metric(["host"], field("host_capacity_bytes"))
    yield capacity
    yield _counter(
        "alora_prefix_cache_queries",
        "Prompt tokens of every request (each looks up the KV index).",
        field("query_tokens"),
    )
    hits = CounterMetricFamily(
        "alora_prefix_cache_hits", "Prompt tokens reused from the KV cache, by tier.", labels=["tier"]
    )
    hit_tokens = field("hit_tokens", {})
    for tier in TIERS:
        hits.add_metric([tier], hit_tokens.get(tier, 0))
    yield hits
    yield _counter(
        "alora_prefix_cache_recomputed_tokens",
        "Tokens a lower tier held but recomputing them was cheaper.",
        field("recomputed_tokens"),
    )
    evicted = CounterMetricFamily(
        "alora_kv_cache_evicted_blocks",
        "Blocks moved out of a tier, by destination (a lower tier, or dropped).",
        labels=["tier", "destination"],
    )
    counts = dict.fromkeys(EVICTIONS, 0)
    for path, n in field("demoted_blocks", {}).items():
        tier, _, destination = path.partition("->")
        counts[(tier, destination)] = counts.get((tier, destination), 0) + n
    for tier, n in field("dropped_blocks", {}).items():
        counts[(tier, "dropped")] = counts.get((tier, "dropped"), 0) + n
    for (tier, destination), n in counts.items():
        evicted.add_metric([tier, destination], n)
    yield evicted
    promoted = CounterMetricFamily(
        "alora_kv_cache_promoted_blocks", "Blocks restored to the device, by source tier.", labels=["tier"]
    )
    promoted_blocks = field("promoted_blocks", {})
    for tier in ("host", "redis"):
        promoted.add_metric([tier], promoted_blocks.get(tier, 0))
    yield promoted
    yield from _index_metrics(field)
    for name, doc, values in (
        ("alora_kv_cache_transfer_bytes", "Bytes moved between tiers.", field("transfer_bytes", {})),
        ("alora_kv_cache_transfer_seconds", "Time spent moving them.", field("transfer_seconds", {})),
        ("alora_kv_cache_transfers", "Transfers between tiers.", field("transfer_count", {})),
    ):
        family = CounterMetricFamily(name, f"{doc} By direction.", labels=["direction"])
        for direction in dict.fromkeys([*TRANSFERS, *values]):
            family.add_metric([direction.replace("->", "_to_")], values.get(direction, 0))
        yield family
    errors = CounterMetricFamily(
        "alora_redis_errors",
        "Redis errors by kind: moved / ask (redirections, followed), timeout, connection, "
        "cluster_down, other.",
        labels=["kind"],
    )
    kinds = field("redis_error_kinds", {})
    for kind in dict.fromkeys([*ERROR_KINDS, *kinds]):
        errors.add_metric([kind], kinds.get(kind, 0))
    yield errors
    latency = HistogramMetricFamily(
        "alora_redis_node_latency_seconds",
        "Round trip of one command or pipeline to a Redis node (send -> last reply), by node "
        "(host:port of a standalone Redis or Cluster master; sentinel:<name>).",
        labels=["node"],
    )
    for node, histogram in sorted(field("redis_node_latency", {}).items()):
        bounds = [*(str(b) for b in NODE_LATENCY_BUCKETS), "+Inf"]
        latency.add_metric([node], list(zip(bounds, histogram.buckets, strict=True)), histogram.sum_s)
    yield latency
    yield _counter(
        "alora_redis_writes_skipped", "Redis writes not attempted (degraded, buffer full).",
        field("redis_writes_skipped"),
    )  # fmt: skip
    discarded = CounterMetricFamily(
        "alora_redis_discarded_entries", "Redis values refused (stale, corrupt...).", labels=["reason"]
    )
    entries = field("discarded_entries", {})
    for reason in dict.fromkeys([*DISCARD_REASONS, *entries]):
        discarded.add_metric([reason], entries.get(reason, 0))
    yield discarded
    yield _gauge(
        "alora_redis_enabled", "1 when a Redis tier is configured.", int(field("redis_enabled", False))
    )
    yield _gauge(
        "alora_redis_degraded",
        "1 while Redis is unreachable (caches recomputed).",
        int(field("degraded", False)),
    )
    yield _gauge(
        "alora_redis_pending_write_bytes",
        "Bytes staged for Redis, not written yet.",
        field("pending_write_bytes"),
    )


def _index_metrics(field: Callable[..., Any]) -> Iterator[Metric]:
    """The KV index: hit rate by adapter kind, blocks per tier, evictions by reason, Redis probes."""
    for name, doc, values in (
        ("alora_prefix_cache_kind_queries", "Prompt tokens looked up", field("kind_query_tokens", {})),
        ("alora_prefix_cache_kind_hits", "Prompt tokens reused", field("kind_hit_tokens", {})),
    ):
        family = CounterMetricFamily(name, f"{doc}, by adapter kind (base, alora, lora).", labels=["kind"])
        for kind in ADAPTER_KINDS:
            family.add_metric([kind], values.get(kind, 0))
        yield family
    blocks = GaugeMetricFamily(
        "alora_prefix_cache_blocks",
        "Blocks in the KV index, by the local tier holding them.",
        labels=["tier"],
    )
    index_blocks = field("index_blocks", {})
    for tier in INDEX_TIERS:
        blocks.add_metric([tier], index_blocks.get(tier, 0))
    yield blocks
    evictions = CounterMetricFamily(
        "alora_prefix_cache_evictions",
        "Blocks evicted from a tier, by reason (pressure: room needed, budget: over the device "
        "budget, deleted: DELETE /conversations).",
        labels=["tier", "reason"],
    )
    evicted = field("evicted_blocks", {})
    for tier in INDEX_TIERS:
        for reason in EVICTION_REASONS:
            evictions.add_metric([tier, reason], evicted.get(f"{tier}:{reason}", 0))
    yield evictions
    yield _counter(
        "alora_prefix_cache_redis_probes",
        "Requests without a conversation that asked Redis how far cached values go.",
        field("probes"),
    )


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
