"""Bad input raises a typed error with a clear message, and leaves the engine exact for the next request."""

import pytest

from alora_core import Engine, SamplingParams
from alora_core.errors import (
    AloraError,
    ContextTooLongError,
    InvalidRequestError,
    InvocationMissingError,
    UnknownAdapterError,
    UnknownConversationError,
)
from tests.alora_core.conftest import PeftOracle, random_ids
from tests.alora_core.test_engine_parity import GREEDY, assert_matches, snapshot

BAD_REQUESTS = [
    ("empty input", lambda e: e.generate("c", [], GREEDY), InvalidRequestError, "empty"),
    (
        "token id above vocab",
        lambda e: e.generate("c", [5, 10_000], GREEDY),
        InvalidRequestError,
        "vocabulary",
    ),
    ("negative token id", lambda e: e.generate("c", [5, -1], GREEDY), InvalidRequestError, "vocabulary"),
    ("context too long", lambda e: e.generate("c", [5] * 4096, GREEDY), ContextTooLongError, "4096"),
    ("unknown adapter", lambda e: e.intrinsic("nope", "c", None, GREEDY), UnknownAdapterError, "nope"),
    (
        "unknown conversation",
        lambda e: e.intrinsic("certainty", "zzz", None, GREEDY),
        UnknownConversationError,
        "zzz",
    ),
    (
        "aLoRA input without invocation",
        lambda e: e.intrinsic("certainty", None, [5, 6, 7], GREEDY),
        InvocationMissingError,
        "invocation",
    ),
    (
        "zero max_tokens",
        lambda e: e.generate("c", [5], SamplingParams(max_tokens=0)),
        InvalidRequestError,
        "max_tokens",
    ),
    (
        "negative temperature",
        lambda e: e.generate("c", [5], SamplingParams(temperature=-1)),
        InvalidRequestError,
        "temperature",
    ),
    ("top_p zero", lambda e: e.generate("c", [5], SamplingParams(top_p=0.0)), InvalidRequestError, "top_p"),
    (
        "no context at all",
        lambda e: e.intrinsic("certainty", None, None, GREEDY),
        InvalidRequestError,
        "conversation",
    ),
]


@pytest.mark.parametrize(("case", "call", "error", "needle"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_raises_typed_error_and_engine_stays_exact(
    engine: Engine, oracle: PeftOracle, case: str, call, error: type[AloraError], needle: str
) -> None:
    history = random_ids(40, seed=21)
    engine.generate("c", history, SamplingParams(max_tokens=2, ignore_eos=True))
    before, free_before = snapshot(engine, "c"), engine.pool.num_free

    with pytest.raises(error) as info:
        call(engine)
    assert needle in info.value.message
    assert 400 <= info.value.status_code < 500

    after = snapshot(engine, "c")
    assert after[:3] == before[:3]
    assert engine.pool.num_free == free_before
    context = engine.conversation_tokens("c") + list(
        engine.adapters.get("certainty").spec.invocation_tokens or ()
    )
    assert_matches(engine.intrinsic("certainty", "c", None, GREEDY), oracle, "certainty", context)


def test_context_too_long_states_both_numbers(engine: Engine) -> None:
    with pytest.raises(ContextTooLongError) as info:
        engine.generate(None, [5] * 5000, GREEDY)
    assert "5000" in info.value.message and str(engine.max_model_len) in info.value.message


def test_generation_stops_at_max_model_len(make_engine, oracle: PeftOracle) -> None:
    engine = make_engine(max_model_len=40)
    context = random_ids(36, seed=22)
    result = engine.generate("c", context, SamplingParams(max_tokens=50, ignore_eos=True))
    assert result.finish_reason == "length"
    assert len(context) + len(result.token_ids) == 40


def test_delete_conversation_frees_its_blocks(engine: Engine) -> None:
    free = engine.pool.num_free
    engine.generate("c", random_ids(70, seed=23), GREEDY)
    assert engine.pool.num_free < free
    engine.delete_conversation("c")
    assert engine.pool.num_free == free
    with pytest.raises(UnknownConversationError):
        engine.conversation("c")
