"""Automatic prefix caching over HTTP: clients that resend their whole history without a
conversation id get it from the KV index, on this server or another one sharing Redis; tenants and
cache salts never share KV. Every output is checked against PEFT on the same context."""

from pathlib import Path

import httpx
import pytest

from alora_core.fixtures import DemoPaths
from tests.alora_core.conftest import PeftOracle, random_ids
from tests.alora_core.redis_server import RedisServer
from tests.ops.conftest import scrape
from tests.service.conftest import FREE_TEXT
from tests.service.test_redis_tier import client as redis_client
from tests.service.test_redis_tier import serve

BS = 16
N = 5


def full_blocks(n: int) -> int:
    return n // BS * BS


def post(http: httpx.Client, path: str, body: dict) -> dict:
    if path.startswith("/intrinsic"):  # free text, as PEFT's unconstrained oracle generates it
        body = {"response_format": FREE_TEXT, **body}
    response = http.post(path, json={"max_tokens": N, **body})
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_stateless_multi_turn_reuses_every_previous_turn(client: httpx.Client, oracle: PeftOracle) -> None:
    history = random_ids(45, seed=4900)
    previous = 0
    for turn in range(3):
        body = post(client, "/generate", {"input_ids": history})  # no conversation id: full history
        assert body["token_ids"] == oracle.generate(None, history, N)[0]
        assert body["usage"]["cached_tokens"] >= full_blocks(previous)
        previous = len(history)
        history = history + body["token_ids"] + random_ids(11, seed=4901 + turn)
    history = history[:-11]  # the last turn's prompt and output

    # an aLoRA on that history reuses the base prefix up to the block holding its invocation
    certainty = post(client, "/intrinsic/certainty", {"input_ids": history})
    start = certainty["activation_start"]
    assert start == len(history)
    assert certainty["usage"]["cached_tokens"] == min(start // BS, (len(history) - 1) // BS) * BS
    context = history + oracle.tokenizer.encode(
        "<|start_of_role|>certainty<|end_of_role|>", add_special_tokens=False
    )
    assert certainty["token_ids"] == oracle.generate("certainty", context, N)[0]

    # a plain LoRA reuses no base block; called again on the grown history, only its own blocks
    rewrite = post(client, "/intrinsic/rewrite", {"input_ids": history})
    assert rewrite["usage"]["cached_tokens"] == 0
    assert rewrite["token_ids"] == oracle.generate("rewrite", history, N)[0]
    grown = history + random_ids(20, seed=4905)
    again = post(client, "/intrinsic/rewrite", {"input_ids": grown})
    assert again["usage"]["cached_tokens"] == full_blocks(len(history))
    assert again["token_ids"] == oracle.generate("rewrite", grown, N)[0]


def test_api_keys_and_cache_salts_share_nothing(
    client: httpx.Client, client_b: httpx.Client, oracle: PeftOracle
) -> None:
    prompt = random_ids(70, seed=4910)
    expected = oracle.generate(None, prompt, N)[0]
    first = post(client, "/generate", {"input_ids": prompt})
    assert first["usage"]["cached_tokens"] == 0 and first["token_ids"] == expected
    other_key = post(client_b, "/generate", {"input_ids": prompt})
    assert other_key["usage"]["cached_tokens"] == 0 and other_key["token_ids"] == expected
    salted = post(client, "/generate", {"input_ids": prompt, "cache_salt": "user-1"})
    assert salted["usage"]["cached_tokens"] == 0 and salted["token_ids"] == expected
    same_salt = post(client, "/generate", {"input_ids": prompt, "cache_salt": "user-1"})
    assert same_salt["usage"]["cached_tokens"] == full_blocks(len(prompt))
    assert post(client, "/generate", {"input_ids": prompt})["usage"]["cached_tokens"] == full_blocks(
        len(prompt)
    )
    # intrinsics without a conversation: the same
    assert post(client, "/intrinsic/rewrite", {"input_ids": prompt})["usage"]["cached_tokens"] == 0
    assert post(client_b, "/intrinsic/rewrite", {"input_ids": prompt})["usage"]["cached_tokens"] == 0
    salted = post(client, "/intrinsic/rewrite", {"input_ids": prompt, "cache_salt": "user-1"})
    assert salted["usage"]["cached_tokens"] == 0
    again = post(client, "/intrinsic/rewrite", {"input_ids": prompt})
    assert again["usage"]["cached_tokens"] == full_blocks(len(prompt))
    assert again["token_ids"] == oracle.generate("rewrite", prompt, N)[0]


@pytest.mark.redis
def test_a_second_server_finds_a_prefix_the_first_computed(
    demo: DemoPaths, oracle: PeftOracle, redis_server: RedisServer, tmp_path: Path
) -> None:
    prompt = random_ids(150, seed=4920)
    first = serve(demo, redis_server.url, tmp_path / "first.log")
    try:
        turn = post(redis_client(first), "/generate", {"input_ids": prompt})  # no conversation id
    finally:
        first.stop()  # finishes its Redis writes

    second = serve(demo, redis_server.url, tmp_path / "second.log")
    try:
        history = prompt + turn["token_ids"] + random_ids(9, seed=4921)
        body = post(redis_client(second), "/generate", {"input_ids": history})
        assert body["usage"]["cached_tokens"] == full_blocks(len(prompt) + N - 1)
        assert body["token_ids"] == oracle.generate(None, history, N)[0]
        metrics = redis_client(second).get("/metrics").text
        assert (
            'alora_prefix_cache_hits_total{tier="redis"} ' + f"{full_blocks(len(prompt) + N - 1)}.0"
            in metrics
        )
    finally:
        second.stop()


def test_prefix_cache_metrics_by_kind_tier_and_reason(client: httpx.Client) -> None:
    """Every request counts, by adapter kind; index blocks per tier and evictions per reason are
    exported with every declared label value (0 until seen)."""
    before = scrape(client)
    prompt = random_ids(60, seed=4930)
    first = post(client, "/intrinsic/rewrite", {"input_ids": prompt})
    second = post(client, "/intrinsic/rewrite", {"input_ids": prompt})
    base = post(client, "/generate", {"input_ids": prompt})
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    lora = [first, second]
    assert delta("alora_prefix_cache_kind_queries_total", kind="lora") == sum(
        r["usage"]["prompt_tokens"] for r in lora
    )
    assert delta("alora_prefix_cache_kind_hits_total", kind="lora") == second["usage"]["cached_tokens"] > 0
    assert delta("alora_prefix_cache_kind_queries_total", kind="base") == base["usage"]["prompt_tokens"]
    assert delta("alora_prefix_cache_kind_hits_total", kind="base") == base["usage"]["cached_tokens"] == 0
    assert after.value("alora_prefix_cache_blocks", tier="device") > 0
    blocks = {s.labels["tier"] for s in after.samples["alora_prefix_cache_blocks"]}
    evictions = {
        (s.labels["tier"], s.labels["reason"]) for s in after.samples["alora_prefix_cache_evictions_total"]
    }
    assert blocks == {"device", "host"}
    assert evictions == {(t, r) for t in ("device", "host") for r in ("pressure", "budget", "deleted")}
