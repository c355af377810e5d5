"""The KV index (automatic prefix caching) against the PEFT oracle: every request reuses the longest
cached block prefix of its tokens, with or without a conversation, and never KV computed for other
tokens, another tenant or salt, another adapter, or another activation position."""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from alora_core import Engine, SamplingParams
from alora_core.fixtures import DemoPaths
from tests.alora_core.conftest import PeftOracle, random_ids
from tests.alora_core.test_engine_parity import GREEDY, assert_matches, invocation

BS = 16  # the engines' block size
ONCE = SamplingParams(max_tokens=4, ignore_eos=True)


def full_blocks(n: int) -> int:
    return n // BS * BS


def test_unrelated_requests_share_a_system_prompt(
    make_engine: Callable[..., Engine], oracle: PeftOracle
) -> None:
    """Two requests (no conversation, then two different conversations) that share only a 1024-token
    system prompt share its blocks: the second reuses all of them and the pool grows only by the
    blocks of what differs."""
    engine = make_engine(num_blocks=200)
    system = random_ids(1024, seed=700)
    low_water: list[int] = []
    engine.scheduler.step_observers.append(lambda _: low_water.append(engine.pool.num_empty))
    for first_id, second_id, seed in ((None, None, 701), ("alice", "bob", 703)):
        first = system + random_ids(37, seed=seed)
        second = system + random_ids(29, seed=seed + 1)
        assert_matches(engine.generate(first_id, first, GREEDY), oracle, None, first)
        empty = engine.pool.num_empty
        low_water.clear()
        result = engine.generate(second_id, second, GREEDY)
        assert_matches(result, oracle, None, second)
        assert result.usage.cached_tokens == 1024  # the system prompt's 64 full blocks
        # new KV: positions 1024.. of the prompt and the generated tokens, nothing of the system prompt
        new_tokens = len(second) + GREEDY.max_tokens - 1 - 1024
        assert empty - min(low_water) == -(-new_tokens // BS)  # blocks taken while it ran
        kept = -(-new_tokens // BS) if second_id else new_tokens // BS  # + a handle's partial last block
        assert empty - engine.pool.num_empty == kept  # its full ones stay cached


def alora_prompts(engine: Engine) -> tuple[list[int], list[int]]:
    """Two prompts equal over blocks 0-2 whose last invocation starts at 33 and at 46 (crossing into
    block 3): block 2 holds adapted positions in both, for two activation starts."""
    inv = invocation(engine, "certainty")
    assert len(inv) == 4
    head = random_ids(33, seed=710) + inv + random_ids(9, seed=711)  # invocation at 33, 46 tokens
    early = head + inv[:2] + random_ids(12, seed=712)  # 46, 47: a partial invocation only
    late = head + inv + random_ids(10, seed=713)  # invocation at 46..49, across blocks 2 and 3
    assert early[:48] == late[:48] and early[48] != late[48]
    return early, late


def test_alora_blocks_are_never_reused_across_activation_positions(
    engine: Engine, oracle: PeftOracle
) -> None:
    early, late = alora_prompts(engine)
    first = engine.intrinsic("certainty", None, early, GREEDY)
    assert first.activation_start == 33
    assert_matches(first, oracle, "certainty", early)

    second = engine.intrinsic("certainty", None, late, GREEDY)
    assert second.activation_start == 46
    assert_matches(second, oracle, "certainty", late)  # the adapted block 2 of `early` is not reused
    assert second.usage.cached_tokens == 32  # base blocks 0 and 1 are

    again = engine.intrinsic("certainty", None, late, GREEDY)  # the same adapter, tokens and start
    assert_matches(again, oracle, "certainty", late)
    assert again.usage.cached_tokens == full_blocks(len(late))


def test_an_aloras_base_blocks_serve_base_requests(engine: Engine, oracle: PeftOracle) -> None:
    history = random_ids(75, seed=720)
    context = history + invocation(engine, "certainty")
    assert_matches(engine.intrinsic("certainty", None, context, GREEDY), oracle, "certainty", context)
    turn = engine.generate(None, history + random_ids(5, seed=721), GREEDY)  # base blocks 0-3 (64 tokens)
    assert turn.usage.cached_tokens == 64
    assert_matches(turn, oracle, None, history + random_ids(5, seed=721))


def test_conversations_and_id_less_requests_share_both_ways(engine: Engine, oracle: PeftOracle) -> None:
    history = random_ids(70, seed=730)
    engine.generate("conv", history, ONCE)
    extended = engine.conversation_tokens("conv") + random_ids(9, seed=731)
    idless = engine.generate(None, extended, GREEDY)
    assert idless.usage.cached_tokens == full_blocks(len(history) + ONCE.max_tokens - 1)
    assert_matches(idless, oracle, None, extended)

    other = random_ids(90, seed=732)
    engine.generate(None, other, ONCE)
    named = engine.generate("new-conv", other + random_ids(3, seed=733), GREEDY)
    assert named.usage.cached_tokens == full_blocks(len(other) + ONCE.max_tokens - 1)
    assert_matches(named, oracle, None, other + random_ids(3, seed=733))
    assert engine.conversation("new-conv").num_tokens == len(other) + 3 + GREEDY.max_tokens


def test_tenants_and_salts_share_nothing(engine: Engine, oracle: PeftOracle) -> None:
    prompt = random_ids(60, seed=740)
    engine.generate(None, prompt, ONCE, tenant="a")
    assert engine.generate(None, prompt, ONCE, tenant="a").usage.cached_tokens == 48
    assert engine.generate(None, prompt, ONCE, tenant="b").usage.cached_tokens == 0
    assert engine.generate(None, prompt, ONCE, tenant="a", cache_salt="s1").usage.cached_tokens == 0
    assert engine.generate(None, prompt, ONCE, tenant="a", cache_salt="s2").usage.cached_tokens == 0
    salted = engine.generate(None, prompt, GREEDY, tenant="a", cache_salt="s1")
    assert salted.usage.cached_tokens == 48
    assert_matches(salted, oracle, None, prompt)
    # a conversation key's namespace is its tenant: "b:conv" shares nothing with tenant "a"
    assert engine.generate("b:conv", prompt, ONCE).usage.cached_tokens == 48  # tenant b's blocks


def test_plain_lora_reuses_only_its_own_blocks(engine: Engine, oracle: PeftOracle) -> None:
    history = random_ids(50, seed=750)
    engine.generate(None, history, ONCE)  # base blocks of the history
    first = engine.intrinsic("rewrite", None, history, GREEDY)
    assert first.usage.cached_tokens == 0
    assert_matches(first, oracle, "rewrite", history)
    grown = history + random_ids(30, seed=751)  # the next turn
    second = engine.intrinsic("rewrite", None, grown, GREEDY)
    assert second.usage.cached_tokens == full_blocks(
        len(history)
    )  # its own blocks, only the new turn computed
    assert_matches(second, oracle, "rewrite", grown)


def reweighted_adapter(src: Path, dst: Path) -> Path:
    """The same adapter config with other weights (every lora_B doubled)."""
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "adapter_model.safetensors"))
    save_file(
        {k: v * 2 if "lora_B" in k else v for k, v in weights.items()}, str(dst / "adapter_model.safetensors")
    )
    return dst


def test_an_adapter_reloaded_with_other_weights_never_hits_its_old_blocks(
    engine: Engine, demo: DemoPaths, tmp_path: Path
) -> None:
    context = random_ids(70, seed=760)
    engine.intrinsic("rewrite", None, context, GREEDY)
    old = engine.intrinsic("rewrite", None, context, GREEDY)
    assert old.usage.cached_tokens == 64  # its blocks are cached

    engine.adapters.unload("rewrite")
    path = reweighted_adapter(demo.adapters["rewrite"], tmp_path / "rewrite-v2")
    engine.adapters.load("rewrite", path)
    new = engine.intrinsic("rewrite", None, context, GREEDY)
    assert new.usage.cached_tokens == 0
    base = AutoModelForCausalLM.from_pretrained(str(demo.model), dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(path)).eval()
    with torch.inference_mode():
        out = reference.generate(
            input_ids=torch.tensor([context]),
            attention_mask=torch.ones(1, len(context), dtype=torch.long),
            max_new_tokens=GREEDY.max_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert new.token_ids == out.sequences[0, len(context) :].tolist()
    assert new.logits is not None
    torch.testing.assert_close(new.logits, torch.stack(out.logits)[:, 0], atol=1e-4, rtol=0)
    assert json.loads((path / "adapter_config.json").read_text())  # the same config, other weights


def test_demoted_prefix_blocks_come_back_from_the_host(
    make_engine: Callable[..., Engine], oracle: PeftOracle
) -> None:
    engine = make_engine(num_blocks=12, host_cache_bytes=1 << 20, restore_policy="always")  # 192 slots
    a, b = random_ids(150, seed=770), random_ids(150, seed=771)
    engine.generate(None, a, ONCE)
    engine.generate(None, b, ONCE)  # needs the pool: a's blocks are demoted to the host
    assert engine.cache_stats().demoted_blocks["device->host"] > 0
    again = engine.generate(None, a + random_ids(4, seed=772), GREEDY)
    assert again.usage.cached_tokens == full_blocks(len(a) + ONCE.max_tokens - 1)
    assert engine.cache_stats().hit_tokens["host"] > 0
    assert_matches(again, oracle, None, a + random_ids(4, seed=772))


@pytest.mark.slow
def test_the_index_is_small() -> None:
    """The index's own memory per cached block (measured at 100k blocks: docs/caching.md)."""
    from loadtest.bench_prefix import index_bytes_per_block

    assert index_bytes_per_block(100_000, BS) < 512


@pytest.mark.parametrize("weak", [False, True], ids=["xxh3", "constant-hash"])
def test_hash_collisions_never_give_a_wrong_answer(
    make_engine: Callable[..., Engine], oracle: PeftOracle, monkeypatch: pytest.MonkeyPatch, weak: bool
) -> None:
    """With every block hashing alike, candidates collide across token ids, parents, tenants,
    salts and adapters: exact matching still reuses exactly what the real hash does."""
    from alora_core.kvcache import index

    if weak:
        monkeypatch.setattr(index, "block_hash", lambda data, seed: 7)
    engine = make_engine()
    x0, x1, y0, y1 = (random_ids(BS, seed=780 + i) for i in range(4))
    tail, tail12 = random_ids(5, seed=785), random_ids(12, seed=786)
    inv = invocation(engine, "certainty")
    steps: list[tuple[str, str | None, list[int], dict[str, str], int]] = [
        ("base", None, x0 + x1 + tail, {}, 0),
        ("base", None, y0 + y1 + tail, {}, 0),  # other token ids
        ("base", None, x0 + y1 + tail, {}, BS),  # block 1's tokens are y1's, its parent x0: not y1's entry
        ("base", None, x0 + x1 + tail, {"tenant": "other"}, 0),
        ("base", None, x0 + x1 + tail, {"cache_salt": "salt"}, 0),
        ("rewrite", None, x0 + x1 + tail, {}, 0),  # the same tokens under a LoRA
        ("certainty", None, x0 + x1 + inv + tail12, {}, 2 * BS),  # base blocks before the invocation's
        ("base", None, x0 + x1 + inv + tail12 + tail, {}, 2 * BS),  # the aLoRA's adapted block 2 is not base
    ]
    for adapter, conv, prompt, keys, cached in steps:
        name = None if adapter == "base" else adapter
        result = (
            engine.generate(conv, prompt, GREEDY, **keys)
            if name is None
            else engine.intrinsic(name, conv, prompt, GREEDY, **keys)
        )
        assert result.usage.cached_tokens == cached, (adapter, keys)
        assert_matches(result, oracle, name, prompt)


def check_invariants(engine: Engine) -> None:
    """Where every block is, as the pool, the host tier, the index and the handles each see it."""
    tiers, pool, host = engine.tiers, engine.pool, engine.tiers.host
    entries = []
    for head in engine.index._by_hash.values():
        while head is not None:
            entries.append(head)
            head = head.next
    assert len(entries) == len(engine.index) and all(e.resident for e in entries)
    assert tiers.num_device == sum(e.device >= 0 for e in entries)
    assert tiers.num_host == sum(e.host >= 0 for e in entries)
    for e in entries:
        if e.device >= 0:
            assert tiers.entry_at(e.device) is e and pool.is_cached(e.device)
    lru = {**tiers._host_lru, **tiers._host_lru_protected}
    assert len(lru) == len(tiers._host_lru) + len(tiers._host_lru_protected)
    assert len(lru) + host.num_free == host.num_blocks  # every used host block has one owner
    assert sorted(host._free) == sorted(set(host._free)) and not set(host._free) & set(lru)
    for hb, owner in lru.items():
        assert (owner.host == hb) if hasattr(owner, "hash") else (owner.host.blocks == [hb])
    with_ref = sum(pool.ref_count(b) > 0 for b in range(pool.num_blocks))
    assert with_ref + pool.num_free == pool.num_blocks
    for conv in engine.conversations.lru():
        for i, block in enumerate(conv.kv.blocks[: len(conv.chain)]):
            assert conv.chain[i].device == block and pool.ref_count(block) > 0
        assert all(e.handles > 0 for e in conv.chain)


def test_churn_through_every_tier_stays_exact(make_engine: Callable[..., Engine]) -> None:
    """A small pool, host tier and device budget under a random mix of id-less and conversation
    requests, base, aLoRA and LoRA, on shared prefixes: every output equals an engine that never
    evicts, and the tiers' bookkeeping agrees after every request."""
    import random

    params = SamplingParams(max_tokens=5, ignore_eos=True, return_logits=True)
    small = make_engine(num_blocks=24, host_cache_bytes=16 * 8192, device_cache_bytes=6 * 8192)
    reference = make_engine(num_blocks=512)
    rng = random.Random(5)
    systems = [random_ids(40, seed=790 + i) for i in range(3)]
    histories: dict[str, list[int]] = {}
    for step in range(48):
        kind = rng.choice(["base", "base", "certainty", "rewrite", "turn", "turn", "conv-intrinsic"])
        prompt = rng.choice(systems) + random_ids(rng.randint(1, 40), seed=5000 + step)
        calls = []
        if kind == "base":
            calls = [lambda e, p=prompt: e.generate(None, p, params)]
        elif kind in ("certainty", "rewrite"):
            context = prompt + (invocation(small, kind) if kind == "certainty" else [])
            calls = [lambda e, c=context, k=kind: e.intrinsic(k, None, c, params)]
        elif kind == "turn":
            conv = f"c{rng.randint(0, 3)}"
            history = histories.get(conv, rng.choice(systems)) + random_ids(
                rng.randint(1, 20), seed=6000 + step
            )
            calls = [lambda e, conv=conv, h=history: e.generate(conv, h, params)]
        elif histories:
            conv = rng.choice(sorted(histories))
            name = rng.choice(["certainty", "answerability", "rewrite"])
            calls = [lambda e, conv=conv, name=name: e.intrinsic(name, conv, None, params)]
        for call in calls:
            got, want = call(small), call(reference)
            assert got.token_ids == want.token_ids, (step, kind)
            torch.testing.assert_close(got.logits, want.logits, atol=3e-5, rtol=0)
        if kind == "turn":
            histories[conv] = small.conversation_tokens(conv)
        check_invariants(small)
    stats = small.cache_stats()
    assert stats.demoted_blocks["device->host"] > 0 and stats.hit_tokens["host"] > 0
    assert stats.dropped_blocks.get("host", 0) > 0  # the host tier filled up too
