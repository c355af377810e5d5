"""Continuous batching: batch invariance, per-conversation order, backpressure, preemption, cancellation."""

import threading
from collections.abc import Callable

import pytest

from alora_core import Engine, SamplingParams
from alora_core.errors import ConversationBusyError, OverloadedError, RequestCancelledError
from alora_core.model import attention, cpu_linear
from alora_core.step import Work
from tests.alora_core.conftest import PeftOracle, random_ids
from tests.alora_core.test_engine_parity import GREEDY, assert_matches

CONVERSATIONS = {f"conv{i}": random_ids(10 + 13 * i, seed=300 + i) for i in range(6)}


def seed_conversations(engine: Engine) -> None:
    for key, history in CONVERSATIONS.items():
        engine.generate(key, history, SamplingParams(max_tokens=3, ignore_eos=True))


def mixed_requests(engine: Engine) -> list[tuple[str, Callable[..., object]]]:
    """18 requests: base turns, aLoRA (new + legacy format) and LoRA intrinsics, explicit inputs, fan-out."""
    inv = list(engine.adapters.get("certainty").spec.invocation_tokens or ())
    out: list[tuple[str, Callable[..., object]]] = []
    for i, key in enumerate(CONVERSATIONS):
        n = 4 + i
        out.append(
            (
                f"{key}/certainty",
                lambda e, k=key, n=n, **kw: e.submit_intrinsic(
                    "certainty", k, None, SamplingParams(max_tokens=n), **kw
                ),
            )
        )
        out.append(
            (
                f"{key}/answerability",
                lambda e, k=key, **kw: e.submit_intrinsic(
                    "answerability", k, None, SamplingParams(max_tokens=5), **kw
                ),
            )
        )
    for i in range(3):
        ids = random_ids(30 + 25 * i, seed=400 + i)
        out.append(
            (
                f"new{i}/generate",
                lambda e, i=i, ids=ids, **kw: e.submit_generate(
                    f"new{i}", ids, SamplingParams(max_tokens=6), **kw
                ),
            )
        )
        out.append(
            (
                f"rewrite{i}",
                lambda e, ids=ids, **kw: e.submit_intrinsic(
                    "rewrite", None, ids, SamplingParams(max_tokens=5), **kw
                ),
            )
        )
        ctx = ids + inv
        out.append(
            (
                f"explicit{i}",
                lambda e, ctx=ctx, **kw: e.submit_intrinsic(
                    "certainty", None, ctx, SamplingParams(max_tokens=4), **kw
                ),
            )
        )
    return out


@pytest.mark.parametrize(
    "path", ["parts", "eager_parts", "gathered", "transposed_linears", "packed_linears", "plain_linears"]
)
def test_concurrent_mixed_batch_equals_one_at_a_time(
    make_engine, oracle: PeftOracle, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the CPU's batched attention kernel (and, `eager_parts`, its per-run eager path); with the
    GPU's gathered batches (forced onto the CPU here); and with every CPU linear on one layout at every
    row count (whatever calibration picks): W @ x^T, the oneDNN-packed weights, or F.linear unfused."""
    overrides: dict[str, object] = {}
    if path == "eager_parts":
        overrides["cpu_kernels"] = False
    if path == "gathered":
        monkeypatch.setattr(attention, "GATHER_DEVICES", frozenset({"cpu", "cuda"}))
    for layout in ("transposed", "packed"):
        if path == f"{layout}_linears":
            monkeypatch.setattr(
                cpu_linear, "_choice", lambda *_, m=layout: (m,) * len(cpu_linear.ROW_BUCKETS)
            )
    if path == "plain_linears":
        overrides["calibrate_cpu_linears"] = False
    sequential = make_engine(max_num_seqs=1, **overrides)
    batched = make_engine(max_num_seqs=64, max_num_batched_tokens=48, prefill_chunk_tokens=32, **overrides)
    for engine in (sequential, batched):
        seed_conversations(engine)

    expected = {name: submit(sequential).result().token_ids for name, submit in mixed_requests(sequential)}

    streamed: dict[str, list[int]] = {}
    cancel_after = {"conv1/certainty": 1, "new2/generate": 2}  # two requests are cancelled mid-generation
    handles = {}
    steps: list[int] = []
    record_steps(batched, lambda work: steps.append(len(work)))
    for name, submit in mixed_requests(batched):
        tokens = streamed.setdefault(name, [])

        def on_token(token: int, name: str = name, tokens: list[int] = tokens) -> None:
            tokens.append(token)
            if len(tokens) == cancel_after.get(name):
                handles[name].cancel()

        handles[name] = submit(batched, on_token=on_token)
    assert len(handles) >= 16

    for name, handle in handles.items():
        if name in cancel_after:
            with pytest.raises(RequestCancelledError):
                handle.result(timeout=120)
            continue
        result = handle.result(timeout=120)
        assert result.token_ids == expected[name], name
        assert streamed[name] == result.token_ids, name  # streamed tokens are exactly the result
    assert max(steps) > 1  # requests really shared forwards

    # a cancelled first turn leaves no conversation behind; a cancelled intrinsic leaves its conversation as it was
    assert "new2" not in batched.conversations
    assert batched.conversation_tokens("conv1") == sequential.conversation_tokens("conv1")
    # and the results are PEFT's
    history = batched.conversation_tokens("conv3")
    inv = list(batched.adapters.get("answerability").spec.invocation_tokens or ())
    assert_matches(
        batched.intrinsic("answerability", "conv3", None, GREEDY), oracle, "answerability", history + inv
    )
    # every fork was freed: only the conversations' own blocks are in use
    in_use = sum(len(c.kv.blocks) for c in batched.conversations._by_key.values())
    assert batched.pool.num_free == batched.pool.num_blocks - in_use


def record_steps(engine: Engine, hook: Callable[[list[Work]], None]) -> None:
    """Observe each step's work list (which sequences, which positions) without changing it."""
    engine.scheduler.step_observers.append(lambda work: hook(list(work)))


def test_a_turn_then_an_intrinsic_on_the_same_conversation_run_in_order(engine: Engine) -> None:
    history = random_ids(20, seed=500)
    engine.generate("c", history, SamplingParams(max_tokens=2, ignore_eos=True))
    turn2 = engine.conversation_tokens("c") + random_ids(5, seed=501)
    gen = engine.submit_generate("c", turn2, SamplingParams(max_tokens=7, ignore_eos=True))
    intr = engine.submit_intrinsic("certainty", "c", None, SamplingParams(max_tokens=2))
    turn = gen.result(timeout=60)
    inv = engine.adapters.get("certainty").spec.invocation_tokens or ()
    assert intr.result(timeout=60).usage.prompt_tokens == len(turn2) + len(turn.token_ids) + len(inv)


def test_decode_keeps_running_while_a_long_prompt_prefills(make_engine) -> None:
    engine = make_engine(max_num_batched_tokens=24, prefill_chunk_tokens=24)
    steps: list[list[tuple[int, int, int]]] = []
    record_steps(engine, lambda work: steps.append([(id(seq), start, end) for seq, start, end in work]))
    started = threading.Event()
    decoding = engine.submit_generate(
        "d",
        random_ids(10, seed=502),
        SamplingParams(max_tokens=40, ignore_eos=True),
        on_token=lambda _: started.set(),
    )
    assert started.wait(60)
    long_prompt = engine.submit_generate(
        "p", random_ids(200, seed=503), SamplingParams(max_tokens=1, ignore_eos=True)
    )
    long_prompt.result(timeout=60)
    decoding.result(timeout=60)

    prefill_steps = [s for s in steps if any(end - start > 1 for _, start, end in s)]
    assert len(prefill_steps) >= 200 // 24  # the long prompt went in chunks
    for step in steps:
        assert sum(end - start for _, start, end in step) <= 24
    decode_id = next(seq for seq, start, end in steps[0])
    during = [s for s in prefill_steps if s[0][1] > 10 or len(s) > 1]
    assert all(any(seq == decode_id for seq, _, _ in s) for s in during if len(s) > 1)
    assert (
        sum(1 for s in during if len(s) > 1) >= len(prefill_steps) - 2
    )  # decode rode along in (nearly) every chunk


def test_full_waiting_queue_refuses_with_retry_after(make_engine) -> None:
    engine = make_engine(max_num_seqs=1, max_waiting=2)
    started, release = threading.Event(), threading.Event()

    def hold(_: int) -> None:
        started.set()
        release.wait(30)

    running = engine.submit_generate(
        "a", random_ids(10, seed=504), SamplingParams(max_tokens=3, ignore_eos=True), on_token=hold
    )
    assert started.wait(60)
    queued = [
        engine.submit_generate(f"q{i}", random_ids(10, seed=505 + i), SamplingParams(max_tokens=2))
        for i in range(2)
    ]
    with pytest.raises(OverloadedError) as info:
        engine.submit_generate("late", random_ids(10, seed=510), SamplingParams(max_tokens=2))
    assert info.value.status_code == 429 and info.value.retry_after_s > 0
    release.set()
    running.result(timeout=60)
    for handle in queued:
        handle.result(timeout=60)


def test_kv_exhaustion_preempts_and_recomputes_exactly(make_engine) -> None:
    prompts = {f"p{i}": random_ids(40 + 7 * i, seed=520 + i) for i in range(5)}
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    roomy = make_engine(max_num_seqs=1)
    expected = {k: roomy.generate(k, v, params).token_ids for k, v in prompts.items()}

    tight = make_engine(num_blocks=14, max_num_batched_tokens=64)  # 224 slots for 5 x ~80 tokens
    handles = {k: tight.submit_generate(k, v, params) for k, v in prompts.items()}
    results = {k: h.result(timeout=120).token_ids for k, h in handles.items()}
    assert results == expected
    assert tight.scheduler.preemptions > 0


def test_delete_of_a_busy_conversation_is_refused(engine: Engine) -> None:
    started, release = threading.Event(), threading.Event()

    def hold(_: int) -> None:
        started.set()
        release.wait(30)

    handle = engine.submit_generate(
        "busy", random_ids(12, seed=530), SamplingParams(max_tokens=2, ignore_eos=True), on_token=hold
    )
    assert started.wait(60)
    with pytest.raises(ConversationBusyError):
        engine.delete_conversation("busy")
    release.set()
    handle.result(timeout=60)
    engine.delete_conversation("busy")


def test_fan_out_shares_the_conversation_prefix(engine: Engine) -> None:
    history = random_ids(150, seed=540)
    engine.generate("c", history, SamplingParams(max_tokens=1, ignore_eos=True))
    conv_blocks = len(engine.conversations.get("c").kv.blocks)
    free_before = engine.pool.num_free
    low_water: list[int] = []
    record_steps(engine, lambda work: low_water.append(engine.pool.num_free))
    names = ["certainty", "answerability", "certainty", "answerability"]
    handles = [
        engine.submit_intrinsic(n, "c", None, SamplingParams(max_tokens=4, ignore_eos=True)) for n in names
    ]
    results = [h.result(timeout=60) for h in handles]
    assert all(r.usage.cached_tokens == 150 for r in results)
    # each fork copies at most its partly filled block and adds its own: nothing like 4 copies of the prefix
    assert free_before - min(low_water) <= 4 * 2
    assert conv_blocks >= 150 // 16
    assert engine.pool.num_free == free_before
