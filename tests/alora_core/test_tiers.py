"""Tiered conversation caches without Redis: device -> host demotion and promotion, the budgets, and
the cost model. The oracle is the same requests on an engine whose caches never leave the device."""

import os
import random
from collections.abc import Callable

import pytest
import torch

from alora_core import Engine, GenerationResult, SamplingParams
from alora_core.kvcache.cost_model import CostModel
from tests.alora_core.conftest import PeftOracle, random_ids
from tests.alora_core.redis_server import free_port
from tests.alora_core.test_engine_parity import GREEDY, assert_matches, invocation

PARAMS = SamplingParams(max_tokens=4, ignore_eos=True, return_logits=True)
BLOCK_BYTES = 2 * 2 * 2 * 16 * 16 * 4  # tiny model: layers, K|V, KV heads, block size 16, head dim, fp32
# Restored K/V are the same bytes; only where they lie in the pool differs, so attention splits the
# keys into other runs and merges their softmax in another order: float32 rounding, ~1e-6 relative
# on logits of magnitude ~3. A wrong or stale block moves logits by O(1).
LOGITS_ATOL = 3e-5


Step = tuple[str, str, int]  # (kind, conversation, seed): a base turn or an intrinsic


class Client:
    """Sends each conversation's FULL history with every turn, as the API asks of clients."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.histories: dict[str, list[int]] = {}

    def run(self, steps: list[Step]) -> list[GenerationResult]:
        """A generate appends new tokens to the history; an intrinsic runs on the conversation's tokens."""
        out = []
        for kind, conv, seed in steps:
            if kind == "generate":
                prompt = self.histories.get(conv, []) + random_ids(20 + seed % 40, seed)
                out.append(self.engine.generate(conv, prompt, PARAMS))
                self.histories[conv] = prompt + out[-1].token_ids
            else:
                out.append(self.engine.intrinsic(kind, conv, None, PARAMS))
        return out


def assert_same(results: list[GenerationResult], expected: list[GenerationResult]) -> None:
    assert len(results) == len(expected)
    for i, (got, want) in enumerate(zip(results, expected, strict=True)):
        assert got.token_ids == want.token_ids, i
        assert got.logits is not None and want.logits is not None
        torch.testing.assert_close(got.logits, want.logits, atol=LOGITS_ATOL, rtol=0)


def workload(conversations: int, turns: int, seed: int) -> list[Step]:
    rng = random.Random(seed)
    steps: list[Step] = []
    for turn in range(turns):
        order = list(range(conversations))
        rng.shuffle(order)
        for c in order:
            steps.append(("generate", f"t{c % 3}:c{c}", 1000 * turn + c))
            if rng.random() < 0.5:
                steps.append((rng.choice(["certainty", "answerability"]), f"t{c % 3}:c{c}", 0))
    return steps


def test_host_tier_round_trip_is_exact(make_engine: Callable[..., Engine], oracle: PeftOracle) -> None:
    reference = make_engine()
    tiered = make_engine(device_cache_bytes=0, host_cache_bytes=1 << 20, restore_policy="always")
    steps = workload(conversations=4, turns=3, seed=1)
    expected = Client(reference).run(steps)
    results = Client(tiered).run(steps)
    assert_same(results, expected)
    assert [r.usage.cached_tokens for r in results] == [r.usage.cached_tokens for r in expected]

    info = tiered.conversation("t1:c1")  # device budget 0: every idle conversation lies on the host
    assert (info.cache_location, info.device_tokens, info.host_tokens) == ("host", 0, info.cached_tokens)
    assert info.cached_tokens == info.num_tokens - 1
    stats = tiered.cache_stats()
    assert stats.promoted_blocks["host"] > 0 and stats.demoted_blocks["device->host"] > 0
    assert stats.hit_tokens["host"] == sum(r.usage.cached_tokens for r in results)
    assert stats.hit_tokens.get("device", 0) == 0
    assert stats.device_bytes == 0 and stats.host_bytes > 0
    # and a restored cache is PEFT's
    history = tiered.conversation_tokens("t1:c1")
    assert_matches(
        tiered.intrinsic("certainty", "t1:c1", None, GREEDY),
        oracle,
        "certainty",
        history + invocation(tiered, "certainty"),
    )


def test_demotion_moves_only_the_blocks_needed(
    make_engine: Callable[..., Engine], oracle: PeftOracle
) -> None:
    engine = make_engine(num_blocks=10, host_cache_bytes=1 << 20, restore_policy="always")  # 160 slots
    a, b = random_ids(90, seed=18), random_ids(90, seed=19)
    engine.generate("a", a, SamplingParams(max_tokens=2, ignore_eos=True))
    engine.generate("b", b, SamplingParams(max_tokens=2, ignore_eos=True))  # needs some of a's blocks

    info = engine.conversation("a")
    assert info.cache_location == "host" and info.cached_tokens == 91
    assert 0 < info.device_tokens < 91 and info.device_tokens % 16 == 0  # a's last blocks moved, not all
    assert info.host_tokens == 91 - info.device_tokens

    context = engine.conversation_tokens("a") + invocation(engine, "certainty")
    result = engine.intrinsic("certainty", "a", None, GREEDY)  # promotes a back (b's blocks demoted)
    assert result.usage.cached_tokens == 91
    assert_matches(result, oracle, "certainty", context)
    assert engine.conversation("b").host_tokens > 0


def test_budgets_hold_while_conversations_come_and_go(make_engine: Callable[..., Engine]) -> None:
    block_bytes = BLOCK_BYTES
    device_budget, host_budget = 12 * block_bytes, 20 * block_bytes  # far below the working set
    reference = make_engine()
    tiered = make_engine(num_blocks=40, device_cache_bytes=device_budget, host_cache_bytes=host_budget)
    steps = workload(conversations=24, turns=2, seed=2)
    expected = Client(reference).run(steps)
    peak_device = peak_host = 0

    def observe(_: object) -> None:  # at every step, under the state lock
        nonlocal peak_device, peak_host
        peak_device = max(peak_device, tiered.tiers.idle_device_bytes(tiered.scheduler.busy_conversations()))
        peak_host = max(peak_host, tiered.tiers.host.bytes_used)

    tiered.scheduler.step_observers.append(observe)
    assert_same(Client(tiered).run(steps), expected)
    stats = tiered.cache_stats()
    assert peak_device <= device_budget and peak_host <= host_budget
    assert stats.dropped_blocks["host"] > 0  # the host tier filled up: its LRU blocks were dropped
    assert stats.hit_tokens["host"] > 0 and stats.hit_tokens["device"] > 0


def test_cost_model_picks_restore_or_recompute(
    make_engine: Callable[..., Engine], oracle: PeftOracle
) -> None:
    engine = make_engine(device_cache_bytes=0, host_cache_bytes=1 << 20)
    history = random_ids(100, seed=5)
    engine.generate("c", history, SamplingParams(max_tokens=1, ignore_eos=True))
    assert engine.conversation("c").cache_location == "host"
    context = engine.conversation_tokens("c") + invocation(engine, "certainty")

    # a host link slower than prefill: recompute, and the answer is the same
    engine.tiers.cost = CostModel(prefill_s_per_token=1e-6, host_bytes_per_s=1e3, learn=False)
    slow = engine.intrinsic("certainty", "c", None, GREEDY)
    assert slow.usage.cached_tokens == 0
    assert_matches(slow, oracle, "certainty", context)
    assert engine.cache_stats().recomputed_tokens == 100

    engine.tiers.cost = CostModel(prefill_s_per_token=1e-3, host_bytes_per_s=1e10, learn=False)
    fast = engine.intrinsic("certainty", "c", None, GREEDY)
    assert fast.usage.cached_tokens == 100
    assert_matches(fast, oracle, "certainty", context)


@pytest.mark.parametrize(
    ("tokens", "restore"),
    [(16, False), (2048, True)],  # one block: the Redis round trip costs more than its prefill
)
def test_cost_model_recomputes_a_short_redis_prefix(tokens: int, restore: bool) -> None:
    model = CostModel(prefill_s_per_token=2e-5, redis_bytes_per_s=1e9, redis_latency_s=1e-3, learn=False)
    nbytes = tokens * 16 * 1024  # 16 KiB per token
    assert (model.restore_s(0, nbytes) < model.recompute_s(tokens)) is restore


def test_cost_model_learns_from_measurements() -> None:
    model = CostModel(prefill_s_per_token=1.0, host_bytes_per_s=1.0)
    for _ in range(50):
        model.observe_prefill(tokens=100, seconds=0.01)
        model.observe_transfer("host", nbytes=1 << 20, seconds=1e-3)
    assert model.prefill_s_per_token == pytest.approx(1e-4, rel=0.01)
    assert model.host_bytes_per_s == pytest.approx((1 << 20) / 1e-3, rel=0.01)


def test_kv_cache_fraction_sizes_the_pool(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(num_blocks=None, kv_cache_fraction=0.001)
    block_bytes = BLOCK_BYTES
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 1 < engine.pool.num_blocks <= total * 0.001 / block_bytes


def test_redis_blocks_only_continue_a_whole_block_prefix(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(redis_url=f"redis://127.0.0.1:{free_port()}/0", restore_policy="always")
    with engine.scheduler.state_lock:  # a conversation Redis holds 150 tokens of (no I/O happens)
        conv = engine.conversations.get_or_create("c")
        conv.token_ids, conv.remote_tokens = list(range(3, 163)), 150
        conv.kv.reserve(100)
        conv.kv.num_tokens = 100  # e.g. a preempted turn truncated it mid-block
        assert engine.tiers.plan(conv, 150) == 100  # recompute: Redis values start at block 96
        conv.kv.truncate(96)
        assert engine.tiers.plan(conv, 150) == 150
