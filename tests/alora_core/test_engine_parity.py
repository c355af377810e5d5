"""The engine against Hugging Face PEFT on the same weights (float32, CPU): tokens equal, logits ~1e-5.

Block size 16 throughout, so the context lengths below are shorter than a block, exactly blocks,
several blocks, and not multiples of the block size.
"""

import pytest
import torch

from alora_core import Engine, SamplingParams
from tests.alora_core.conftest import PeftOracle, random_ids

LOGITS_ATOL = 1e-4
GREEDY = SamplingParams(max_tokens=6, return_logits=True)


def assert_matches(result, oracle: PeftOracle, adapter: str | None, context: list[int]) -> None:
    ref_tokens, ref_logits = oracle.generate(adapter, context, GREEDY.max_tokens)
    assert result.token_ids == ref_tokens
    assert result.logits is not None
    assert result.logits.shape == ref_logits.shape
    torch.testing.assert_close(result.logits, ref_logits, atol=LOGITS_ATOL, rtol=0)


def invocation(engine: Engine, name: str) -> list[int]:
    return list(engine.adapters.get(name).spec.invocation_tokens or ())


def assert_mixed_batch_matches(
    engine: Engine,
    oracle: PeftOracle,
    conversation: str,
    alora: tuple[str, ...],
    rewrite_input: list[int],
    base_input: list[int],
    timeout: float = 600,
) -> None:
    """The aLoRA intrinsics `alora` on `conversation`, the LoRA `rewrite` on `rewrite_input` and a base
    turn of `base_input`, submitted together (they share steps): each equal to PEFT on its context."""
    history = engine.conversation_tokens(conversation)
    handles = [
        (name, engine.submit_intrinsic(name, conversation, None, GREEDY), history + invocation(engine, name))
        for name in alora
    ]
    handles.append(
        ("rewrite", engine.submit_intrinsic("rewrite", None, rewrite_input, GREEDY), rewrite_input)
    )
    handles.append((None, engine.submit_generate("other", base_input, GREEDY), base_input))
    for adapter, handle, context in handles:
        assert_matches(handle.result(timeout=timeout), oracle, adapter, context)


@pytest.mark.parametrize("length", [5, 16, 37, 64, 90])
def test_base_generate_matches_transformers(engine: Engine, oracle: PeftOracle, length: int) -> None:
    context = random_ids(length, seed=length)
    result = engine.generate("c", context, GREEDY)
    assert_matches(result, oracle, None, context)


@pytest.mark.parametrize("adapter", ["certainty", "answerability"])
@pytest.mark.parametrize("length", [5, 16, 37, 64, 90])
def test_alora_intrinsic_on_cached_conversation_matches_peft(
    engine: Engine, oracle: PeftOracle, adapter: str, length: int
) -> None:
    history = random_ids(length, seed=100 + length)
    turn = engine.generate("c", history, SamplingParams(max_tokens=3, ignore_eos=True))
    full_history = history + turn.token_ids

    result = engine.intrinsic(adapter, "c", None, GREEDY)

    context = full_history + invocation(engine, adapter)
    assert_matches(result, oracle, adapter, context)
    # everything before the invocation came from the conversation's base cache
    assert result.activation_start == len(full_history)
    assert result.usage.cached_tokens == len(full_history) - 1  # the last sampled token has no KV yet
    assert result.usage.prompt_tokens == len(context)


@pytest.mark.parametrize("length", [5, 37, 90])
def test_plain_lora_recomputes_and_matches_peft(engine: Engine, oracle: PeftOracle, length: int) -> None:
    history = random_ids(length, seed=200 + length)
    engine.generate("c", history, SamplingParams(max_tokens=1))
    result = engine.intrinsic("rewrite", "c", history, GREEDY)
    assert_matches(result, oracle, "rewrite", history)
    assert result.usage.cached_tokens == 0


def test_alora_on_explicit_input_without_conversation(engine: Engine, oracle: PeftOracle) -> None:
    context = random_ids(23, seed=7) + invocation(engine, "certainty") + random_ids(3, seed=8)
    result = engine.intrinsic("certainty", None, context, GREEDY)
    assert_matches(result, oracle, "certainty", context)
    assert result.activation_start == 23


def test_last_invocation_occurrence_is_the_activation_start(engine: Engine, oracle: PeftOracle) -> None:
    inv = invocation(engine, "certainty")
    context = random_ids(10, seed=9) + inv + random_ids(20, seed=10) + inv
    result = engine.intrinsic("certainty", None, context, GREEDY)
    assert result.activation_start == 30 + len(inv)
    assert_matches(result, oracle, "certainty", context)


def snapshot(engine: Engine, conversation_id: str) -> tuple[list[int], list[int], int, torch.Tensor]:
    conv = engine.conversations.get(conversation_id)
    assert conv is not None
    slots = conv.kv.slots(0, conv.kv.num_tokens) if conv.kv.num_tokens else torch.empty(0, dtype=torch.long)
    kv = engine.pool.kv[:, :, :, slots].clone()
    return list(conv.token_ids), list(conv.kv.blocks), conv.kv.num_tokens, kv


def assert_unchanged(engine: Engine, conversation_id: str, before: tuple, free_before: int) -> None:
    after = snapshot(engine, conversation_id)
    assert after[:3] == before[:3]
    assert torch.equal(after[3], before[3])  # bit-identical KV
    assert engine.pool.num_free == free_before  # the fork's blocks were all returned


def test_multi_turn_conversation_with_intrinsics(engine: Engine, oracle: PeftOracle) -> None:
    """generate -> generate -> intrinsic -> generate -> intrinsic, each checked on the full history."""
    history = random_ids(21, seed=11)
    r1 = engine.generate("chat", history, GREEDY)
    assert_matches(r1, oracle, None, history)
    assert r1.usage.cached_tokens == 0

    history = history + r1.token_ids + random_ids(9, seed=12)
    r2 = engine.generate("chat", history, GREEDY)
    assert_matches(r2, oracle, None, history)
    assert r2.usage.cached_tokens == 21 + len(r1.token_ids) - 1

    history = history + r2.token_ids
    before, free_before = snapshot(engine, "chat"), engine.pool.num_free
    r3 = engine.intrinsic("certainty", "chat", None, GREEDY)
    assert_matches(r3, oracle, "certainty", history + invocation(engine, "certainty"))
    assert_unchanged(engine, "chat", before, free_before)

    history = history + random_ids(17, seed=13)
    r4 = engine.generate("chat", history, GREEDY)
    assert_matches(r4, oracle, None, history)
    assert r4.usage.cached_tokens == len(history) - 17 - 1

    history = history + r4.token_ids
    before, free_before = snapshot(engine, "chat"), engine.pool.num_free
    r5 = engine.intrinsic("answerability", "chat", None, GREEDY)
    assert_matches(r5, oracle, "answerability", history + invocation(engine, "answerability"))
    assert_unchanged(engine, "chat", before, free_before)
    assert engine.conversation_tokens("chat") == history


def test_invocation_partly_inside_the_cached_prefix(engine: Engine, oracle: PeftOracle) -> None:
    """The history already ends with the invocation's first tokens: that overlap is recomputed with the adapter."""
    inv = invocation(engine, "certainty")
    history = random_ids(30, seed=14) + inv[:2]
    engine.generate("c", history, SamplingParams(max_tokens=1))
    context = history + inv[2:]
    assert context[-len(inv) :] == inv

    result = engine.intrinsic("certainty", "c", context, GREEDY)

    assert result.activation_start == 30
    assert result.usage.cached_tokens == 30  # reuse stops at the activation start, not at the cached length
    assert_matches(result, oracle, "certainty", context)


def test_divergent_history_reuses_only_the_common_prefix(engine: Engine, oracle: PeftOracle) -> None:
    history = random_ids(50, seed=15)
    first = engine.generate("c", history, SamplingParams(max_tokens=4, ignore_eos=True))
    edited = history[:20] + random_ids(25, seed=16)  # an earlier turn was edited
    assert edited[20] != history[20]

    result = engine.generate("c", edited, GREEDY)
    assert result.usage.cached_tokens == 20
    assert_matches(result, oracle, None, edited)
    assert first.token_ids  # the first turn ran

    alora = engine.intrinsic("certainty", "c", None, GREEDY)
    assert_matches(alora, oracle, "certainty", edited + result.token_ids + invocation(engine, "certainty"))


def test_chunked_prefill_matches(make_engine, oracle: PeftOracle) -> None:
    engine = make_engine(prefill_chunk_tokens=7)
    history = random_ids(60, seed=17)
    assert_matches(engine.generate("c", history, GREEDY), oracle, None, history)
    context = history + invocation(engine, "certainty")
    assert_matches(engine.intrinsic("certainty", None, context, GREEDY), oracle, "certainty", context)


def test_full_pool_evicts_idle_conversations_and_stays_exact(make_engine, oracle: PeftOracle) -> None:
    engine = make_engine(num_blocks=10)  # 160 token slots: a and b do not both fit
    a = random_ids(90, seed=18)
    b = random_ids(90, seed=19)
    engine.generate("a", a, SamplingParams(max_tokens=2, ignore_eos=True))
    result = engine.generate("b", b, GREEDY)  # needs a's blocks: a loses its last ones, not its history
    assert_matches(result, oracle, None, b)
    assert engine.conversation("a").cached_tokens < 90  # no host tier: demoted blocks are dropped
    again = engine.intrinsic("certainty", "a", None, GREEDY)
    hist_a = engine.conversation_tokens("a")
    assert_matches(again, oracle, "certainty", hist_a + invocation(engine, "certainty"))


def test_bfloat16_engine_is_as_close_to_float32_as_peft_in_bfloat16(
    make_engine, demo, oracle: PeftOracle
) -> None:
    """The serving dtype: a bf16 engine (base turn, then both aLoRA intrinsics as one fan-out, so the
    stacked LoRA and the forks' shared attention run in bf16) against the float32 oracle. Its error
    must be of the size PEFT's own bf16 run makes on the same inputs, not larger."""
    engine = make_engine(dtype="bfloat16")
    peft_bf16 = PeftOracle(demo, torch.bfloat16)
    once = SamplingParams(max_tokens=1, return_logits=True)
    history = random_ids(70, seed=9)

    def check(logits: torch.Tensor | None, adapter: str | None, context: list[int]) -> None:
        assert logits is not None
        exact = oracle.generate(adapter, context, 1)[1]
        peft_error = (peft_bf16.generate(adapter, context, 1)[1] - exact).abs().max().item()
        engine_error = (logits - exact).abs().max().item()
        assert engine_error <= 2 * peft_error + 1e-3, (adapter, engine_error, peft_error)

    turn = engine.generate("c", history, once)
    check(turn.logits, None, history)
    history += turn.token_ids
    names = ["certainty", "answerability"]
    handles = [engine.submit_intrinsic(n, "c", None, once) for n in names]
    for name, handle in zip(names, handles, strict=True):
        check(handle.result().logits, name, history + invocation(engine, name))
