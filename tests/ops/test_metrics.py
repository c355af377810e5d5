"""GET /metrics of a real server: each request moves exactly the series it should, the engine's
state is exported, and no label ever carries a conversation id or an API key."""

import json
import tomllib
from collections.abc import Iterator
from typing import Any, cast

import httpx
from prometheus_client import generate_latest

from alora_core import Engine
from alora_core.errors import AdapterConflictError, AdapterLoadError, AloraError, UnsupportedModelError
from alora_core.step import Work
from service.errors import HTTP_CODES, ServiceError
from service.metrics import ENDPOINTS, REJECTIONS, UNKNOWN, InterTokenTimer, Metrics, error_code_of
from tests.ops.conftest import API_KEY, MAX_REQUEST_BYTES, ROOT, Scrape, scrape
from tests.service.conftest import FREE_TEXT

PER_REQUEST = (
    "alora_time_to_first_token_seconds_count",
    "alora_e2e_request_latency_seconds_count",
    "alora_request_queue_time_seconds_count",
    "alora_request_prefill_time_seconds_count",
    "alora_request_decode_time_seconds_count",
    "alora_request_prompt_tokens_count",
    "alora_request_generation_tokens_count",
)


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


def streamed_final(response: httpx.Response) -> dict[str, Any]:
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    return next(e for e in events if e.get("type") == "final")


def test_each_request_is_counted_once_with_its_usage(ops_client: httpx.Client) -> None:
    conv = "ops-metrics-conversation-1"
    before = scrape(ops_client)
    history = list(range(3, 9))
    first = ops_client.post(
        "/generate", json={"conversation_id": conv, "input_ids": history, "max_tokens": 5, "ignore_eos": True}
    ).json()
    second_body = {
        "conversation_id": conv,
        "input_ids": [*history, *first["token_ids"], 11, 12],
        "max_tokens": 4,
        "ignore_eos": True,
        "stream": True,
    }
    second = streamed_final(ops_client.post("/generate", json=second_body))
    certainty = ops_client.post(
        "/intrinsic/certainty",
        json={"conversation_id": conv, "max_tokens": 3, "ignore_eos": True, "response_format": FREE_TEXT},
    ).json()
    fan_out = ops_client.post(
        "/intrinsics",
        json={
            "conversation_id": conv,
            "intrinsics": ["answerability", {"name": "rewrite", "max_tokens": 3}],
            "max_tokens": 2,
            "ignore_eos": True,
            "response_format": FREE_TEXT,
        },
    )
    assert fan_out.status_code == 200, fan_out.text
    answerability, rewrite = fan_out.json()["results"]
    after = scrape(ops_client)

    generates = [first, second]
    base = {"endpoint": "generate", "adapter": "base"}
    for name in PER_REQUEST:
        assert delta(before, after, name, **base) == 2, name
    assert delta(before, after, "alora_request_success_total", finished_reason="length", **base) == 2
    for counter, field in (
        ("alora_prompt_tokens_total", "prompt_tokens"),
        ("alora_generation_tokens_total", "completion_tokens"),
        ("alora_prompt_tokens_cached_total", "cached_tokens"),
    ):
        assert delta(before, after, counter, **base) == sum(g["usage"][field] for g in generates), counter
    assert delta(before, after, "alora_request_prompt_tokens_sum", **base) == sum(
        g["usage"]["prompt_tokens"] for g in generates
    )
    assert second["usage"]["cached_tokens"] > 0  # the second turn reused the first one's KV
    # one inter-token interval per token after the first
    assert delta(before, after, "alora_inter_token_latency_seconds_count", **base) == (5 - 1) + (4 - 1)

    # labelled by the adapter (the old demo names are aliases of uncertainty and query_rewrite)
    intrinsics = {"uncertainty": certainty, "answerability": answerability, "query_rewrite": rewrite}
    for name, result in intrinsics.items():
        labels = {"endpoint": "intrinsic", "adapter": name}
        for metric in PER_REQUEST:
            assert delta(before, after, metric, **labels) == 1, (name, metric)
        tokens = result["usage"]["completion_tokens"]
        assert delta(before, after, "alora_generation_tokens_total", **labels) == tokens
        assert (
            delta(before, after, "alora_prompt_tokens_cached_total", **labels)
            == result["usage"]["cached_tokens"]
        )
        assert delta(before, after, "alora_inter_token_latency_seconds_count", **labels) == tokens - 1
    assert certainty["usage"]["cached_tokens"] > 0  # an aLoRA reuses the conversation's base KV
    assert rewrite["usage"]["cached_tokens"] == 0  # a plain LoRA reuses nothing

    # the engine's cache counters: every request here looked up the conversation's cache
    everything = [*generates, *intrinsics.values()]
    assert delta(before, after, "alora_prefix_cache_queries_total") == sum(
        r["usage"]["prompt_tokens"] for r in everything
    )
    assert delta(before, after, "alora_prefix_cache_hits_total") == sum(
        r["usage"]["cached_tokens"] for r in everything
    )
    assert ops_client.delete(f"/conversations/{conv}").status_code == 204


def test_rejections_are_counted_by_endpoint_status_and_code(ops_client: httpx.Client) -> None:
    before = scrape(ops_client)
    calls = [
        (ops_client.post("/generate", content=b'{"prompt": '), ("generate", "400", "invalid_request")),
        (
            ops_client.post("/generate", content=b"x" * (MAX_REQUEST_BYTES + 1)),
            ("generate", "413", "request_too_large"),
        ),
        (
            ops_client.post("/generate", json={"input_ids": [5] * 5000}),
            ("generate", "413", "context_too_long"),
        ),
        (ops_client.post("/intrinsic/nope", json={"prompt": "hi"}), ("intrinsic", "404", "unknown_adapter")),
        (
            ops_client.post("/intrinsic/certainty", json={"conversation_id": "ops-never-seen"}),
            ("intrinsic", "404", "unknown_conversation"),
        ),
        (
            httpx.post(str(ops_client.base_url.join("/generate")), json={"prompt": "hi"}),
            ("generate", "401", "unauthorized"),
        ),
    ]
    after = scrape(ops_client)
    for response, (endpoint, status, reason) in calls:
        assert str(response.status_code) == status, response.text
        labels = {"endpoint": endpoint, "status": status, "reason": reason}
        assert delta(before, after, "alora_request_rejected_total", **labels) == 1, labels
    assert delta(before, after, "alora_request_rejected_total") == len(calls)
    assert delta(before, after, "alora_request_success_total") == 0


def test_engine_state_and_info_are_exported(ops_client: httpx.Client) -> None:
    metrics = scrape(ops_client)
    assert metrics.value("alora_adapters_loaded", kind="alora") == 2
    assert metrics.value("alora_adapters_loaded", kind="lora") == 1
    assert {s.labels["adapter"] for s in metrics.samples["alora_adapter_info"]} == {
        "answerability",
        "uncertainty",
        "query_rewrite",
    }
    # idle between tests: nothing runs or waits, and the gauges say so
    assert metrics.samples["alora_num_requests_running"][0].value == 0
    assert metrics.samples["alora_num_requests_waiting"][0].value == 0
    assert 0 <= metrics.samples["alora_kv_cache_usage_perc"][0].value <= 1
    assert metrics.value("alora_kv_cache_capacity_bytes", tier="device") == 2 << 20
    (model,) = metrics.samples["alora_model_info"]
    assert model.labels["model"] == "demo" and model.labels["block_size"] == "16"
    (build,) = metrics.samples["alora_build_info"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert build.labels["version"] == version
    for tier in ("device", "host", "redis"):
        assert (
            len([s for s in metrics.samples["alora_prefix_cache_hits_total"] if s.labels["tier"] == tier])
            == 1
        )
    assert not [name for name in metrics.samples if name.endswith("_created")]


def test_idle_conversations_pushed_out_of_the_pool_are_counted_as_evictions(ops_client: httpx.Client) -> None:
    """Ten idle 600-token conversations do not fit the 4096-token pool: the oldest are demoted."""
    before = scrape(ops_client)
    conversations = [f"ops-evict-{i}" for i in range(10)]
    for i, conv in enumerate(conversations):
        body = {
            "conversation_id": conv,
            "input_ids": [(i * 7 + j) % 400 + 3 for j in range(600)],
            "max_tokens": 1,
        }
        assert ops_client.post("/generate", json=body).status_code == 200
    after = scrape(ops_client)
    for conv in conversations:
        assert ops_client.delete(f"/conversations/{conv}").status_code == 204
    assert delta(before, after, "alora_kv_cache_evicted_blocks_total", tier="device") > 0


def test_no_label_carries_a_conversation_id_an_api_key_or_a_raw_path(ops_client: httpx.Client) -> None:
    secret_conv = "ops-secret-conversation-9d2c"
    ops_client.post("/generate", json={"conversation_id": secret_conv, "prompt": "hi", "max_tokens": 2})
    ops_client.post(f"/intrinsic/{secret_conv}", json={"conversation_id": secret_conv})  # unknown adapter
    ops_client.get(f"/no-such-route/{secret_conv}")
    ops_client.get(f"/conversations/{secret_conv}")
    metrics = scrape(ops_client)
    ops_client.delete(f"/conversations/{secret_conv}")
    values = {value for samples in metrics.samples.values() for s in samples for value in s.labels.values()}
    assert not [v for v in values if secret_conv in v or API_KEY in v]
    adapters = {
        s.labels["adapter"] for samples in metrics.samples.values() for s in samples if "adapter" in s.labels
    }
    assert adapters <= {"base", "answerability", "uncertainty", "query_rewrite"}
    routes = {s.labels["route"] for s in metrics.samples["alora_http_requests_total"]}
    assert "unmatched" in routes and "/conversations/{conversation_id}" in routes


def test_error_code_of_reads_the_error_body() -> None:
    assert error_code_of(b'{"error": {"message": "m", "type": "t", "code": "overloaded"}}') == "overloaded"
    for body in (b"", b"not json", b'{"detail": "x"}', b'{"error": {"code": 5}}', b'{"error": "x"}'):
        assert error_code_of(body) == UNKNOWN


def test_a_429_is_counted_as_rejected_overloaded() -> None:
    """The middleware hands every response to record_http; a 429 body names its code."""
    metrics = Metrics()
    body = json.dumps(
        {"error": {"message": "full", "type": "rate_limit_error", "code": "overloaded"}}
    ).encode()
    metrics.record_http("POST", "/intrinsics", "/intrinsics", 429, body)
    metrics.record_http("GET", "/metrics", "/metrics", 200, b"")
    text = Scrape(generate_latest(metrics.registry).decode())
    assert (
        text.value("alora_request_rejected_total", endpoint="intrinsic", status="429", reason="overloaded")
        == 1
    )
    assert text.value("alora_http_requests_total", route="/intrinsics", status="429") == 1


def test_known_label_values_are_exported_as_zero_before_any_request() -> None:
    metrics = Metrics()
    metrics.bind_routes([("POST", "/generate"), ("GET", "/health")])
    text = Scrape(generate_latest(metrics.registry).decode())
    rejected = {
        (s.labels["endpoint"], s.labels["status"], s.labels["reason"]): s.value
        for s in text.samples["alora_request_rejected_total"]
    }
    assert rejected == {(e, status, code): 0 for e in ENDPOINTS for status, code in REJECTIONS}
    assert ("intrinsic", "429", "overloaded") in rejected  # the dashboards' 429 panel
    http = {
        (s.labels["method"], s.labels["route"], s.labels["status"]): s.value
        for s in text.samples["alora_http_requests_total"]
    }
    assert http == {("POST", "/generate", "500"): 0, ("GET", "/health", "500"): 0}


def test_rejection_label_values_cover_every_error_the_service_answers() -> None:
    """REJECTIONS lists (status, code) of every error class and handler (service/errors.py), less the
    errors that refuse the start-up (an unusable adapter, a model the engine cannot serve exactly):
    no request meets them."""

    def classes(base: type) -> Iterator[type]:
        yield base
        for sub in base.__subclasses__():
            yield from classes(sub)

    answered = {(str(c.status_code), c.code) for base in (AloraError, ServiceError) for c in classes(base)}
    start_up = (AdapterLoadError, AdapterConflictError, UnsupportedModelError)
    answered -= {(str(c.status_code), c.code) for c in start_up}
    answered |= {(str(status), code) for status, code in HTTP_CODES.items()}
    answered |= {("400", "invalid_request"), ("499", "client_closed_request"), ("500", "internal_error")}
    assert answered <= set(REJECTIONS), sorted(answered - set(REJECTIONS))


class StubSequence:
    """What InterTokenTimer reads of a sequence."""

    def __init__(self, prompt: int, adapter_slot: int | None = None) -> None:
        self.num_tokens = prompt
        self.output: list[int] = []
        self.adapter_slot = adapter_slot
        self.finished = False

    def sample(self) -> None:
        self.output.append(1)
        self.num_tokens += 1


def test_inter_token_timer_counts_decode_steps_and_forgets_finished_sequences() -> None:
    metrics = Metrics()
    timer = InterTokenTimer(cast(Engine, None), metrics.itl)
    running, preempted = StubSequence(4), StubSequence(6)
    timer(cast(list[Work], [(running, 0, 4), (preempted, 0, 6)]))  # prefills: no interval yet
    running.sample()
    preempted.sample()
    timer(cast(list[Work], [(running, 4, 5)]))  # `preempted` sits this step out
    running.sample()
    timer(cast(list[Work], [(running, 5, 6), (preempted, 6, 7)]))  # it comes back: its gap counts
    text = Scrape(generate_latest(metrics.registry).decode())
    assert text.value("alora_inter_token_latency_seconds_count", endpoint="generate", adapter="base") == 3
    running.finished = True
    timer(cast(list[Work], [(preempted, 7, 8)]))
    assert {id(s) for s, _ in timer._last.values()} == {id(preempted)}  # no reference kept to `running`
