"""The Redis tier against a real redis-server: any-replica resume, Redis down or killed, damaged
entries, budgets under churn. Never a wrong answer: every output is compared with an engine whose
caches never leave the device (or a fresh recompute)."""

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from alora_core import Engine, SamplingParams
from alora_core.errors import UnknownConversationError
from alora_core.fixtures import DemoPaths
from alora_core.kvcache.codec import encode_meta
from alora_core.kvcache.redis_tier import RedisTier
from tests.alora_core.conftest import TEST_DEVICE, random_ids
from tests.alora_core.redis_server import RedisServer, free_port, redis_binary
from tests.alora_core.test_tiers import BLOCK_BYTES, PARAMS, Client, assert_same, workload

pytestmark = pytest.mark.redis

# nothing stays on this replica: every idle conversation lives in Redis only, 4 blocks per value
REDIS_ONLY = {"device_cache_bytes": 0, "host_cache_bytes": 0, "redis_value_bytes": 4 * BLOCK_BYTES}
PARITY_ATOL = 1e-4  # a resumed cache against a fresh prefill (other chunking), as for PEFT parity


def redis_tier(engine: Engine) -> RedisTier:
    assert engine.tiers.redis is not None
    return engine.tiers.redis


def flush(engine: Engine) -> None:
    assert redis_tier(engine).flush(30), "Redis writes did not finish"


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.05)


REPLICA = """
import json, sys
from alora_core import Engine, EngineConfig, SamplingParams
model, url, key, history, device = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]
config = EngineConfig(model=model, device=device, dtype="float32", num_blocks=256, redis_url=url, redis_value_bytes=16384)
engine = Engine.from_config(config)
result = engine.generate(key, history, SamplingParams(max_tokens=5, ignore_eos=True))
engine.close()  # finishes the writes behind
print(json.dumps(result.token_ids))
"""


def test_another_replica_resumes_a_conversation(
    make_engine: Callable[..., Engine], redis_server: RedisServer, demo: DemoPaths
) -> None:
    key, history = "tenant-a:chat", random_ids(150, seed=40)
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, (str(root), os.environ.get("PYTHONPATH")))),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            REPLICA,
            str(demo.model),
            redis_server.url,
            key,
            json.dumps(history),
            TEST_DEVICE,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    )
    first_turn = json.loads(done.stdout.strip().splitlines()[-1])

    replica = make_engine(redis_url=redis_server.url, redis_value_bytes=16384, restore_policy="always")
    info = replica.conversation(key)
    assert (info.cache_location, info.cached_tokens, info.redis_tokens) == ("redis", 154, 154)
    assert replica.conversation_tokens(key) == history + first_turn

    fresh = make_engine()
    turn = history + first_turn + random_ids(12, seed=41)
    resumed = replica.generate(key, turn, PARAMS)
    expected = fresh.generate("fresh", turn, PARAMS)
    assert resumed.usage.cached_tokens == 154
    assert resumed.token_ids == expected.token_ids
    torch.testing.assert_close(resumed.logits, expected.logits, atol=PARITY_ATOL, rtol=0)

    flush(replica)  # a third replica runs an intrinsic on the conversation as the second left it
    third = make_engine(redis_url=redis_server.url, redis_value_bytes=16384, restore_policy="always")
    intrinsic = third.intrinsic("certainty", key, None, PARAMS)
    context = turn + resumed.token_ids + list(third.adapters.get("certainty").spec.invocation_tokens or ())
    expected = fresh.intrinsic("certainty", None, context, PARAMS)
    assert intrinsic.usage.cached_tokens == len(turn) + 3
    assert intrinsic.token_ids == expected.token_ids
    torch.testing.assert_close(intrinsic.logits, expected.logits, atol=PARITY_ATOL, rtol=0)
    assert third.cache_stats().hit_tokens["redis"] == len(turn) + 3


def test_redis_down_at_start_degrades_then_recovers(make_engine: Callable[..., Engine]) -> None:
    server = RedisServer(redis_binary(), free_port())  # not started yet
    engine = make_engine(redis_url=server.url, restore_policy="always", **REDIS_ONLY)
    client, reference = Client(engine), Client(make_engine())
    first = workload(conversations=3, turns=1, seed=3)
    assert_same(client.run(first), reference.run(first))  # served, by recompute
    stats = engine.cache_stats()
    assert stats.degraded and stats.redis_errors > 0 and stats.hit_tokens.get("redis", 0) == 0

    server.start()
    try:
        wait_until(lambda: not engine.cache_stats().degraded, "the engine sees Redis again")
        second = [(kind, conv, seed + 7) for kind, conv, seed in first]
        assert_same(client.run(second), reference.run(second))
        flush(engine)
        assert server.client().keys("alora:*")  # writing resumed without a restart
        third = [(kind, conv, seed + 11) for kind, conv, seed in first]
        assert_same(client.run(third), reference.run(third))
        assert engine.cache_stats().hit_tokens["redis"] > 0  # and reading
    finally:
        server.kill()


def test_redis_killed_mid_run_keeps_serving(
    make_engine: Callable[..., Engine], redis_server: RedisServer
) -> None:
    engine = make_engine(redis_url=redis_server.url, restore_policy="always", **REDIS_ONLY)
    reference_engine = make_engine()
    client, reference = Client(engine), Client(reference_engine)
    warmup = workload(conversations=6, turns=1, seed=4)
    assert_same(client.run(warmup), reference.run(warmup))
    flush(engine)

    convs = sorted({conv for _, conv, _ in warmup})
    killed = threading.Event()

    def kill_on_first_token(_: int) -> None:
        if not killed.is_set():
            redis_server.kill()
            killed.set()

    handles = [engine.submit_intrinsic("certainty", convs[0], None, PARAMS, on_token=kill_on_first_token)]
    handles += [engine.submit_intrinsic("answerability", c, None, PARAMS) for c in convs[1:]]
    expected = [reference_engine.intrinsic("certainty", convs[0], None, PARAMS)]
    expected += [reference_engine.intrinsic("answerability", c, None, PARAMS) for c in convs[1:]]
    assert_same([h.result(timeout=120) for h in handles], expected)
    assert killed.is_set()

    after = [(kind, conv, seed + 5) for kind, conv, seed in warmup]  # Redis is gone: recompute
    assert_same(client.run(after), reference.run(after))
    stats = engine.cache_stats()
    assert stats.degraded and stats.redis_errors > 0

    redis_server.start()  # an empty Redis comes back on the same port
    wait_until(lambda: not engine.cache_stats().degraded, "the engine sees Redis again")
    again = [(kind, conv, seed + 9) for kind, conv, seed in warmup]
    assert_same(client.run(again), reference.run(again))
    flush(engine)
    assert redis_server.client().keys("alora:*")


@pytest.mark.parametrize(
    "damage", ["truncated", "checksum", "stale", "wrong_model", "wrong_tenant", "missing"]
)
def test_damaged_entries_are_discarded_and_recomputed(
    make_engine: Callable[..., Engine], redis_server: RedisServer, damage: str
) -> None:
    writer = make_engine(redis_url=redis_server.url, **REDIS_ONLY)
    history = random_ids(150, seed=7)
    setup = SamplingParams(max_tokens=3, ignore_eos=True)
    for key, tokens in (("t1:c", history), ("t2:c", history), ("t1:other", random_ids(150, seed=8))):
        writer.generate(key, tokens, setup)
    flush(writer)

    keys, client = redis_tier(writer), redis_server.client()
    victim = keys.chunk_key("t1:c", 1)  # values hold 64 tokens: chunk 1 = positions 64..127
    value = client.get(victim)
    assert isinstance(value, bytes)
    if damage == "truncated":
        client.set(victim, value[:-100])
    elif damage == "checksum":
        flipped = bytearray(value)
        flipped[-50] ^= 0x10
        client.set(victim, bytes(flipped))
    elif damage == "stale":  # another conversation's value (other token ids) under this key
        client.set(victim, client.get(keys.chunk_key("t1:other", 1)))
    elif damage == "wrong_model":  # the same bytes, claimed by another model's fingerprint
        patched = bytearray(value)
        patched[8:24] = b"0123456789abcdef"
        client.set(victim, bytes(patched))
    elif damage == "wrong_tenant":  # same conversation id and tokens, another tenant's value
        client.set(victim, client.get(keys.chunk_key("t2:c", 1)))
        client.set(keys.meta_key("t3:c"), client.get(keys.meta_key("t2:c")))  # and metadata
    else:
        client.delete(victim)

    reader = make_engine(redis_url=redis_server.url, restore_policy="always", **REDIS_ONLY)
    reference = make_engine()
    reference.generate("t1:c", history, setup)
    result = reader.intrinsic("certainty", "t1:c", None, PARAMS)
    expected = reference.intrinsic("certainty", "t1:c", None, PARAMS)
    assert result.token_ids == expected.token_ids
    torch.testing.assert_close(result.logits, expected.logits, atol=1e-5, rtol=0)
    assert result.usage.cached_tokens == 64  # chunk 0 restored, the rest recomputed
    assert reader.cache_stats().discarded_entries == {damage: 1}
    if damage == "wrong_tenant":
        with pytest.raises(UnknownConversationError):
            reader.conversation("t3:c")
        assert reader.cache_stats().discarded_entries == {damage: 2}

    # the damaged reply was read to its end: the next restore on the same connection is whole and exact
    other_meta = keys.lookup("t1:other")
    assert other_meta is not None and other_meta.num_chunks > 2  # more values than reads in flight
    reference.generate("t1:other", random_ids(150, seed=8), setup)
    result = reader.intrinsic("certainty", "t1:other", None, PARAMS)
    expected = reference.intrinsic("certainty", "t1:other", None, PARAMS)
    assert result.token_ids == expected.token_ids
    torch.testing.assert_close(result.logits, expected.logits, atol=1e-5, rtol=0)
    assert result.usage.cached_tokens == other_meta.cached_tokens


def test_a_turn_after_its_own_write_in_flight_restores(
    make_engine: Callable[..., Engine], redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing kept locally: the next turn of a short conversation (its KV in Redis as a tail, which
    the previous turn's write rewrites) arrives while that write is still in flight. It waits for the
    write and restores the conversation, instead of reading no whole value and recomputing it."""
    engine = make_engine(redis_url=redis_server.url, **REDIS_ONLY)
    write = RedisTier._write

    def slow_write(self: RedisTier, job: object) -> None:
        time.sleep(0.5)
        write(self, job)  # type: ignore[arg-type]

    monkeypatch.setattr(RedisTier, "_write", slow_write)
    history = random_ids(30, seed=11)
    first = engine.generate("t1:c", history, PARAMS)
    conv = engine.conversations.get("t1:c")
    assert conv is not None and conv.persist_pending is not None  # the turn's write is in flight
    turn = history + first.token_ids + random_ids(5, seed=12)
    second = engine.generate("t1:c", turn, PARAMS)
    assert second.usage.cached_tokens == len(history) + len(first.token_ids) - 1
    expected = make_engine().generate("fresh", turn, PARAMS)
    assert_same([second], [expected])


def test_a_history_outside_the_vocabulary_is_not_resumed(
    make_engine: Callable[..., Engine], redis_server: RedisServer
) -> None:
    """Requests on a conversation do not recheck its history (checked once, when it enters), so one
    resumed from Redis is checked when it is: metadata whose token ids this model cannot embed (well
    formed, right fingerprint) leaves the conversation unknown, never a failed step."""
    writer = make_engine(redis_url=redis_server.url, **REDIS_ONLY)
    writer.generate("t1:c", random_ids(40, seed=3), SamplingParams(max_tokens=2, ignore_eos=True))
    flush(writer)
    tier, client = redis_tier(writer), redis_server.client()
    meta = tier.lookup("t1:c")
    assert meta is not None
    vocab = writer.loaded.shape.vocab_size
    bad = dataclasses.replace(meta, token_ids=[*meta.token_ids[:-1], vocab])
    client.set(tier.meta_key("t1:c"), encode_meta(tier.layout, tier.blocks_per_value, bad))

    reader = make_engine(redis_url=redis_server.url, **REDIS_ONLY)
    with pytest.raises(UnknownConversationError):
        reader.intrinsic("certainty", "t1:c", None, PARAMS)
    with pytest.raises(UnknownConversationError):
        reader.conversation("t1:c")


def test_hundreds_of_conversations_stay_within_budgets(
    make_engine: Callable[..., Engine], redis_server: RedisServer
) -> None:
    device_budget, host_budget = 16 * BLOCK_BYTES, 32 * BLOCK_BYTES
    engine = make_engine(
        num_blocks=64,
        max_conversations=50,  # conversations also leave this replica entirely, and come back from Redis
        device_cache_bytes=device_budget,
        host_cache_bytes=host_budget,
        redis_url=redis_server.url,
        redis_value_bytes=4 * BLOCK_BYTES,
        restore_policy="always",
    )
    reference = make_engine(num_blocks=2048)
    steps = workload(conversations=200, turns=2, seed=6)
    peak = {"device": 0, "host": 0, "writes": 0}

    def observe(_: object) -> None:
        busy = engine.scheduler.busy_conversations()
        peak["device"] = max(peak["device"], engine.tiers.idle_device_bytes(busy))
        peak["host"] = max(peak["host"], engine.tiers.host.bytes_used)
        peak["writes"] = max(peak["writes"], redis_tier(engine).pending_write_bytes)

    engine.scheduler.step_observers.append(observe)
    assert_same(Client(engine).run(steps), Client(reference).run(steps))
    assert peak["device"] <= device_budget and peak["host"] <= host_budget
    assert peak["writes"] <= redis_tier(engine).max_pending_write_bytes
    stats = engine.cache_stats()
    assert stats.hit_tokens["redis"] > 0 and stats.hit_tokens["host"] > 0
    assert not stats.degraded and stats.redis_errors == 0 and not stats.discarded_entries


def test_delete_removes_the_redis_copy(make_engine: Callable[..., Engine], redis_server: RedisServer) -> None:
    engine = make_engine(redis_url=redis_server.url, **REDIS_ONLY)
    engine.generate("t1:gone", random_ids(150, seed=9), SamplingParams(max_tokens=2))
    engine.generate("t1:kept", random_ids(40, seed=10), SamplingParams(max_tokens=2))
    flush(engine)
    tier, client = redis_tier(engine), redis_server.client()
    assert client.exists(tier.meta_key("t1:gone"), tier.chunk_key("t1:gone", 2)) == 2
    engine.delete_conversation("t1:gone")
    flush(engine)
    assert not client.keys(tier.meta_key("t1:gone").rsplit(":", 1)[0] + ":*")
    assert client.exists(tier.meta_key("t1:kept")) == 1
    other = make_engine(redis_url=redis_server.url, **REDIS_ONLY)
    with pytest.raises(UnknownConversationError):
        other.conversation("t1:gone")
