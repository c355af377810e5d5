"""The Redis tier on a real Redis Cluster (3 masters, one replica each, loopback): values of one chain
spread over every master and stream from all of them at once; MOVED and ASK are followed; a master
killed mid-run costs only its own keys (every other prefix keeps being restored), and the tier recovers
once its replica took over. Every output is compared with PEFT."""

import time
from collections.abc import Callable, Iterator

import pytest

from alora_core import Engine
from alora_core.kvcache import redis_client
from alora_core.kvcache.redis_client import FETCH_WINDOW, ValueStream
from alora_core.kvcache.redis_tier import RedisTier
from tests.alora_core.conftest import PeftOracle, random_ids
from tests.alora_core.redis_server import RedisClusterSet, RedisServer, redis_binary, wait_for
from tests.alora_core.test_engine_parity import GREEDY, assert_matches
from tests.alora_core.test_redis_tier import REDIS_ONLY, flush, redis_tier
from tests.alora_core.test_tiers import BLOCK_BYTES

pytestmark = pytest.mark.redis

ONE_BLOCK_VALUES = {**REDIS_ONLY, "redis_value_bytes": BLOCK_BYTES}  # every block its own value (key)


@pytest.fixture
def cluster() -> Iterator[RedisClusterSet]:
    servers = RedisClusterSet(redis_binary()).start()
    try:
        yield servers
    finally:
        servers.stop()


def conversation_keys(tier: RedisTier, conversation: str) -> list[str]:
    """Every key of a conversation in Redis: its meta, its values, its tail."""
    meta = tier.lookup(conversation)
    assert meta is not None
    return [tier.meta_key(conversation)] + [
        tier.chunk_key(conversation, i) for i in range(meta.num_chunks + 1)
    ]


def test_values_spread_over_every_master_and_stream_from_all_at_once(
    make_engine: Callable[..., Engine],
    cluster: RedisClusterSet,
    oracle: PeftOracle,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writer = make_engine(redis_url=cluster.url, **ONE_BLOCK_VALUES)
    histories = {f"t:c{i}": random_ids(150, seed=900 + i) for i in range(4)}
    for key, history in histories.items():
        writer.generate(key, history, GREEDY)
    flush(writer)
    tier = redis_tier(writer)
    placed = [{cluster.master_of(k).address for k in conversation_keys(tier, key)} for key in histories]
    assert all(len(masters) >= 2 for masters in placed)  # one chain's values spread over the masters
    assert set().union(*placed) == {m.address for m in cluster.masters()}

    in_flight: dict[str, int] = {}  # node -> GETEX sent, reply not read yet
    peak = {"node": 0, "nodes_busy": 0}
    send, read = ValueStream._send, ValueStream.next

    def counting_send(stream: ValueStream, n: int) -> None:
        send(stream, n)
        in_flight[stream.node] = len(stream._sent)
        peak["node"] = max(peak["node"], in_flight[stream.node])
        peak["nodes_busy"] = max(peak["nodes_busy"], sum(1 for v in in_flight.values() if v))

    def counting_next(stream: ValueStream) -> object:
        reply = read(stream)
        in_flight[stream.node] = len(stream._sent)
        return reply

    monkeypatch.setattr(ValueStream, "_send", counting_send)
    monkeypatch.setattr(ValueStream, "next", counting_next)
    reader = make_engine(redis_url=cluster.url, restore_policy="always", **ONE_BLOCK_VALUES)
    for key, history in histories.items():
        turn = history + writer.conversation_tokens(key)[len(history) :] + random_ids(5, seed=950)
        result = reader.generate(key, turn, GREEDY)
        assert result.usage.cached_tokens == len(writer.conversation_tokens(key)) - 1
        assert_matches(result, oracle, None, turn)
    assert peak["node"] == FETCH_WINDOW  # bounded per node, as on one Redis
    assert peak["nodes_busy"] == 3  # ... and every master streams at once
    stats = reader.cache_stats()
    assert set(stats.redis_node_latency) == {m.address for m in cluster.masters()}
    assert all(h.count > 0 for h in stats.redis_node_latency.values())
    assert stats.redis_errors == 0 and not stats.discarded_entries


def move_slot(cluster: RedisClusterSet, key: str, to: RedisServer, finish: bool) -> None:
    """Migrate `key` to master `to`: while its slot migrates the old master answers ASK for it;
    finished (every key of the slot moved, the slot reassigned), MOVED."""
    source = cluster.master_of(key)
    src, dst = source.client(), to.client()
    slot = src.execute_command("CLUSTER", "KEYSLOT", key)
    src_id, dst_id = (c.execute_command("CLUSTER", "MYID").decode() for c in (src, dst))
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
    keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100) if finish else [key]
    src.execute_command("MIGRATE", "127.0.0.1", to.port, "", 0, 5000, "KEYS", *keys)
    if finish:
        for c in (dst, src, *(m.client() for m in cluster.masters())):
            c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)


@pytest.mark.parametrize("redirect", ["moved", "ask"])
def test_moved_and_ask_are_followed(
    make_engine: Callable[..., Engine], cluster: RedisClusterSet, oracle: PeftOracle, redirect: str
) -> None:
    writer = make_engine(redis_url=cluster.url, **ONE_BLOCK_VALUES)
    history = random_ids(100, seed=960)
    writer.generate("t:moving", history, GREEDY)
    flush(writer)
    keys = conversation_keys(redis_tier(writer), "t:moving")
    reader = make_engine(redis_url=cluster.url, restore_policy="always", **ONE_BLOCK_VALUES)  # maps slots now
    moved = [keys[0], keys[3]]  # the handle (read by GETEX) and a value (read by the fetch stream)
    for key in moved:
        target = next(m for m in cluster.masters() if m.port != cluster.master_of(key).port)
        move_slot(cluster, key, target, finish=redirect == "moved")

    turn = history + writer.conversation_tokens("t:moving")[len(history) :] + random_ids(4, seed=961)
    result = reader.generate("t:moving", turn, GREEDY)
    assert_matches(result, oracle, None, turn)
    assert result.usage.cached_tokens == len(writer.conversation_tokens("t:moving")) - 1  # nothing lost
    flush(reader)
    stats = reader.cache_stats()
    assert set(stats.redis_error_kinds) == {redirect} and stats.redis_error_kinds[redirect] >= len(moved)
    assert not stats.degraded and not stats.discarded_entries
    if redirect == "moved":  # the slot map was patched: the reader's own turn was written too
        new_meta = redis_tier(reader).lookup("t:moving")
        assert new_meta is not None and new_meta.token_ids == turn + result.token_ids


@pytest.mark.slow
def test_a_master_killed_mid_run_costs_only_its_own_keys(
    make_engine: Callable[..., Engine], cluster: RedisClusterSet, oracle: PeftOracle
) -> None:
    writer = make_engine(redis_url=cluster.url, **REDIS_ONLY)
    histories = {f"t:k{i}": random_ids(70 + i, seed=970 + i) for i in range(24)}
    for key, history in histories.items():
        writer.generate(key, history, GREEDY)
    flush(writer)
    for master in cluster.masters():  # the replicas hold every key before the kill
        assert master.client().wait(1, 5000) == 1
    victim = cluster.masters()[0]
    on_victim = {
        key
        for key in histories
        if any(cluster.master_of(k).port == victim.port for k in conversation_keys(redis_tier(writer), key))
    }
    assert 0 < len(on_victim) < len(histories)
    turns = {
        k: h + writer.conversation_tokens(k)[len(h) :] + random_ids(3, seed=990) for k, h in histories.items()
    }
    full = {
        k: len(writer.conversation_tokens(k)) - 1 for k in histories
    }  # the writer's KV (last token unfed)

    reader = make_engine(redis_url=cluster.url, restore_policy="always", **REDIS_ONLY)
    reader.generate(None, random_ids(40, seed=991), GREEDY)  # warm: connected, slot map loaded
    victim.kill()
    rounds, seen_degraded = 0, False
    while True:  # every conversation, again and again, until the replica took over and the tier recovered
        for key, turn in turns.items():
            result = reader.generate(key, turn, GREEDY)  # never an error
            assert_matches(result, oracle, None, turn)
            if key not in on_victim:  # its prefix lives on surviving masters: restored throughout
                assert result.usage.cached_tokens >= full[key], (key, rounds)  # (+ the reader's own turns)
            seen_degraded |= reader.cache_stats().degraded
        rounds += 1
        if seen_degraded and not reader.cache_stats().degraded:
            break
        assert rounds < 60, "the tier never recovered"
    kinds = reader.cache_stats().redis_error_kinds
    assert kinds.get("connection", 0) > 0 and set(kinds) <= {"connection", "timeout", "moved", "cluster_down"}

    promoted = cluster.wait_promoted(victim)
    fresh = make_engine(redis_url=cluster.url, restore_policy="always", **REDIS_ONLY)
    for key in sorted(on_victim):  # the promoted replica serves the killed master's keys
        result = fresh.generate(key, turns[key], GREEDY)
        assert result.usage.cached_tokens >= full[key]  # the writer's turn, or the reader's since
        assert_matches(result, oracle, None, turns[key])
    assert promoted.address in fresh.cache_stats().redis_node_latency
    assert not fresh.cache_stats().degraded and fresh.cache_stats().redis_errors == 0


@pytest.mark.slow
def test_clusterdown_while_a_shard_fails_over_means_recompute(
    make_engine: Callable[..., Engine], oracle: PeftOracle
) -> None:
    """With cluster-require-full-coverage yes (Redis's default) every master answers CLUSTERDOWN from
    the moment one is marked failed until its replica is promoted: requests recompute, then reuse."""
    servers = RedisClusterSet(redis_binary(), full_coverage=True).start()
    try:
        writer = make_engine(redis_url=servers.url, **REDIS_ONLY)
        prompts = [random_ids(70 + i, seed=1010 + i) for i in range(6)]
        for prompt in prompts:
            writer.generate(None, prompt, GREEDY)
        flush(writer)
        for master in servers.masters():
            assert master.client().wait(1, 5000) == 1
        reader = make_engine(redis_url=servers.url, restore_policy="always", **REDIS_ONLY)
        survivor = servers.masters()[1].client()
        victim = servers.masters()[0]
        victim.kill()
        wait_for(lambda: b"cluster_state:fail" in survivor.execute_command("CLUSTER", "INFO"), "CLUSTERDOWN")
        seen: set[str] = set()
        deadline = time.monotonic() + 60
        while not (seen >= {"cluster_down"} and not reader.cache_stats().degraded):
            assert time.monotonic() < deadline, reader.cache_stats().redis_error_kinds
            for prompt in prompts:
                result = reader.generate(None, prompt + random_ids(3, seed=1020), GREEDY)
                assert_matches(result, oracle, None, prompt + random_ids(3, seed=1020))
            seen |= set(reader.cache_stats().redis_error_kinds)
        servers.wait_promoted(victim)
        again = [reader.generate(None, p + random_ids(3, seed=1020), GREEDY) for p in prompts]
        assert all(r.usage.cached_tokens > 0 for r in again)  # reuse is back
    finally:
        servers.stop()


def test_cluster_down_at_start_then_up(make_engine: Callable[..., Engine], oracle: PeftOracle) -> None:
    servers = RedisClusterSet(redis_binary())  # not started yet: no seed answers
    try:
        engine = make_engine(redis_url=servers.url, restore_policy="always", **REDIS_ONLY)
        prompt = random_ids(90, seed=1000)
        assert_matches(engine.generate(None, prompt, GREEDY), oracle, None, prompt)
        assert engine.cache_stats().degraded
        servers.start()
        wait_for(lambda: not engine.cache_stats().degraded, "the engine found the cluster")
        engine.generate(None, prompt, GREEDY)
        flush(engine)
        again = engine.generate(None, prompt + random_ids(4, seed=1001), GREEDY)  # a probe, then values
        assert again.usage.cached_tokens == (len(prompt) + GREEDY.max_tokens - 1) // 16 * 16
        assert_matches(again, oracle, None, prompt + random_ids(4, seed=1001))
    finally:
        servers.stop()


def test_a_plain_url_naming_a_cluster_node_is_refused(
    make_engine: Callable[..., Engine], cluster: RedisClusterSet
) -> None:
    with pytest.raises(ValueError, match="is a Redis Cluster node: name the cluster as redis\\+cluster://"):
        make_engine(redis_url=cluster.masters()[0].url)


def test_urls() -> None:
    from alora_core.kvcache.redis_url import parse

    cluster = parse("rediss+cluster://user:p%40ss@h1:7000,[::1]:7001,h3")
    assert (cluster.kind, cluster.addresses) == ("cluster", [("h1", 7000), ("::1", 7001), ("h3", 6379)])
    assert cluster.options == {"ssl": True, "username": "user", "password": "p@ss"}
    sentinel = parse("redis+sentinel://:secret@s1,s2:26380/mymaster/2")
    assert (sentinel.kind, sentinel.master_set, sentinel.db) == ("sentinel", "mymaster", 2)
    assert sentinel.addresses == [("s1", 26379), ("s2", 26380)] and sentinel.options == {"password": "secret"}
    assert (
        parse("redis://h:1/0").kind == "standalone" and parse("unix:///run/redis.sock").kind == "standalone"
    )
    for bad in (
        "http://h:1",
        "redis+cluster://",
        "redis+cluster://h:1/2",
        "redis+sentinel://h:1",
        "redis+sentinel://h:1/m/x",
        "redis+cluster://h:port",
        "redis+cluster://h:1?ssl=true",
    ):
        with pytest.raises(ValueError):
            parse(bad)
    assert redis_client.node_failure(redis_client.ResponseError("CLUSTERDOWN The cluster is down"))
    assert not redis_client.node_failure(redis_client.ResponseError("WRONGTYPE Operation against a key"))
