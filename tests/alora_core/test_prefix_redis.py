"""The KV index's Redis tier against a real redis-server: a prefix computed by a request without a
conversation is found by a probe, on this replica and on another one; a deliberately weak hash
makes every value key collide and still never gives a wrong answer; Redis down means recompute."""

from collections.abc import Callable

import pytest

from alora_core import Engine, SamplingParams
from tests.alora_core.conftest import PeftOracle, random_ids
from tests.alora_core.redis_server import RedisServer, free_port
from tests.alora_core.test_engine_parity import GREEDY, assert_matches
from tests.alora_core.test_redis_tier import REDIS_ONLY, flush

pytestmark = pytest.mark.redis

ONCE = SamplingParams(max_tokens=4, ignore_eos=True)


def test_an_id_less_prefix_comes_back_from_redis_on_any_replica(
    make_engine: Callable[..., Engine], redis_server: RedisServer, oracle: PeftOracle
) -> None:
    first = make_engine(redis_url=redis_server.url, restore_policy="always", **REDIS_ONLY)
    prompt = random_ids(150, seed=800)
    turn = first.generate(None, prompt, ONCE)  # nothing stays local: its blocks live in Redis only
    flush(first)
    assert first.cache_stats().index_blocks == {"device": 0, "host": 0}
    history = prompt + turn.token_ids + random_ids(7, seed=801)
    cached = (len(prompt) + ONCE.max_tokens - 1) // 16 * 16  # its full blocks: prompt and output

    again = first.generate(None, history, GREEDY)
    assert again.usage.cached_tokens == cached
    assert first.cache_stats().hit_tokens["redis"] == cached
    assert_matches(again, oracle, None, history)

    replica = make_engine(redis_url=redis_server.url, restore_policy="always", **REDIS_ONLY)
    elsewhere = replica.generate(None, history, GREEDY)
    assert elsewhere.usage.cached_tokens >= cached
    assert replica.cache_stats().probes == 1 and not replica.cache_stats().discarded_entries
    assert_matches(elsewhere, oracle, None, history)

    other_tenant = replica.generate(None, history, GREEDY, tenant="someone-else")
    assert other_tenant.usage.cached_tokens == 0  # its keys are another tenant's
    assert_matches(other_tenant, oracle, None, history)


def test_colliding_value_keys_are_refused_not_served(
    make_engine: Callable[..., Engine],
    redis_server: RedisServer,
    oracle: PeftOracle,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every block hashes to 7: every value of a tenant has the same key, each write overwrites the
    last. The header's prefix hash (sha256 over the token ids) refuses what another chain wrote."""
    from alora_core.kvcache import index

    monkeypatch.setattr(index, "block_hash", lambda data, seed: 7)
    writer = make_engine(redis_url=redis_server.url, **REDIS_ONLY)
    a, b = random_ids(50, seed=810), random_ids(50, seed=811)  # one value each: blocks [0, 3)
    assert_matches(writer.generate(None, a, GREEDY), oracle, None, a)
    flush(writer)
    assert_matches(writer.generate(None, b, GREEDY), oracle, None, b)  # a's value under b's key: refused
    flush(writer)  # b's value replaced a's
    assert len(redis_server.client().keys("alora:*")) == 1

    reader = make_engine(redis_url=redis_server.url, restore_policy="always", **REDIS_ONLY)
    result = reader.generate(None, a + random_ids(3, seed=812), GREEDY)
    assert_matches(result, oracle, None, a + random_ids(3, seed=812))
    assert result.usage.cached_tokens == 0
    assert reader.cache_stats().discarded_entries.get("stale", 0) >= 1


def test_redis_down_recomputes_without_error(make_engine: Callable[..., Engine], oracle: PeftOracle) -> None:
    engine = make_engine(
        redis_url=f"redis://127.0.0.1:{free_port()}/0", restore_policy="always", **REDIS_ONLY
    )
    prompt = random_ids(120, seed=820)
    assert_matches(engine.generate(None, prompt, GREEDY), oracle, None, prompt)
    again = engine.generate(None, prompt + random_ids(5, seed=821), GREEDY)
    assert again.usage.cached_tokens == 0  # nothing local (budget 0, no host), Redis unreachable
    assert_matches(again, oracle, None, prompt + random_ids(5, seed=821))
    context = prompt + list(engine.adapters.get("certainty").spec.invocation_tokens or ())
    assert_matches(engine.intrinsic("certainty", None, context, GREEDY), oracle, "certainty", context)
    assert engine.cache_stats().degraded
