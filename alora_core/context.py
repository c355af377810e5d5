"""Checks on a request's token context: validity and the aLoRA activation start."""

import itertools
from collections.abc import Iterable

from alora_core.errors import ContextTooLongError, InvalidRequestError, InvocationMissingError
from alora_core.kvcache.block_pool import BlockPool
from alora_core.lora.registry import ResidentAdapter
from alora_core.sampling import SamplingParams


def validate(
    input_ids: list[int],
    params: SamplingParams,
    vocab: int,
    max_model_len: int,
    pool: BlockPool,
    checked: int = 0,
) -> None:
    """Refuse what the engine cannot run: bad parameters, token ids outside the vocabulary, a context
    longer than the model or the KV pool takes. `checked`: the first ids are known to be valid (a
    request's own input, checked at submission; a conversation's history: checked inputs, sampled
    tokens, or checked when resumed from Redis), so an intrinsic on a long conversation costs O(its
    invocation), not O(history) (8192 ids: ~0.7 ms, on the scheduler thread, per request)."""
    params.validate(vocab)
    if not input_ids:
        raise InvalidRequestError("input is empty: at least one token is needed")
    bad = invalid_token_ids(itertools.islice(input_ids, checked, None), vocab)
    if bad:
        raise InvalidRequestError(f"token ids {bad[:8]} fall outside the vocabulary [0, {vocab})")
    if len(input_ids) >= max_model_len:
        raise ContextTooLongError(
            f"input has {len(input_ids)} tokens; the model maximum is {max_model_len} "
            f"including at least one generated token, so at most {max_model_len - 1} input tokens"
        )
    if -(-(len(input_ids) + 1) // pool.block_size) > pool.num_blocks:
        raise ContextTooLongError(
            f"input has {len(input_ids)} tokens; the KV pool holds at most "
            f"{pool.num_blocks * pool.block_size - 1} (raise kv_cache_bytes)"
        )


def invalid_token_ids(input_ids: Iterable[object], vocab: int) -> list[object]:
    """The items that are not token ids of [0, vocab) (bools are not token ids)."""
    return [t for t in input_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]


def activation_start(adapter: ResidentAdapter, context: list[int]) -> int:
    """Position of the LAST occurrence of the adapter's invocation sequence in context (PEFT's rule)."""
    invocation = list(adapter.spec.invocation_tokens or ())
    start = last_occurrence(context, invocation)
    if start is None:
        raise InvocationMissingError(
            f"input does not contain the invocation sequence of aLoRA adapter {adapter.spec.name!r}: "
            f"{adapter.spec.invocation_text!r} = token ids {invocation}"
        )
    return start


def last_occurrence(tokens: list[int], pattern: list[int]) -> int | None:
    m = len(pattern)
    for i in range(len(tokens) - m, -1, -1):
        if tokens[i : i + m] == pattern:
            return i
    return None
