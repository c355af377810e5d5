"""Sampling controls: seeds, top-k / top-p limits, stop strings and stop token ids."""

import torch

from alora_core import Engine, SamplingParams
from alora_core.sampling import sample
from tests.alora_core.conftest import random_ids


def test_same_seed_same_tokens_other_seed_other_tokens(engine: Engine) -> None:
    context = random_ids(20, seed=31)
    params = SamplingParams(max_tokens=12, temperature=1.5, seed=1234, ignore_eos=True)
    a = engine.generate(None, context, params)
    b = engine.generate(None, context, params)
    c = engine.generate(
        None, context, SamplingParams(max_tokens=12, temperature=1.5, seed=99, ignore_eos=True)
    )
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_top_k_one_is_greedy(engine: Engine) -> None:
    context = random_ids(20, seed=32)
    greedy = engine.generate(None, context, SamplingParams(max_tokens=8, ignore_eos=True))
    top1 = engine.generate(
        None, context, SamplingParams(max_tokens=8, temperature=2.0, top_k=1, ignore_eos=True)
    )
    assert greedy.token_ids == top1.token_ids


def test_top_k_and_top_p_only_sample_allowed_tokens() -> None:
    logits = torch.tensor([5.0, 4.0, 3.0, 0.0, -1.0, -2.0])
    gen = torch.Generator().manual_seed(0)
    top_k = {sample(logits, SamplingParams(temperature=1.0, top_k=2), gen) for _ in range(200)}
    assert top_k == {0, 1}
    probs = torch.softmax(logits, -1)  # 0.66, 0.24, 0.09, ...: top_p 0.8 keeps the first two
    assert probs[0] < 0.8 < probs[0] + probs[1]
    top_p = {sample(logits, SamplingParams(temperature=1.0, top_p=0.8), gen) for _ in range(200)}
    assert top_p == {0, 1}


def test_stop_token_ids_and_eos(engine: Engine) -> None:
    context = random_ids(20, seed=33)
    free_run = engine.generate(None, context, SamplingParams(max_tokens=10, ignore_eos=True))
    stop_at = free_run.token_ids[3]
    first = free_run.token_ids.index(stop_at)
    stopped = engine.generate(None, context, SamplingParams(max_tokens=10, stop_token_ids=(stop_at,)))
    assert stopped.token_ids == free_run.token_ids[: first + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop_at)
    assert (free_run.finish_reason, free_run.stop_reason) == ("length", None)


def test_stop_string_truncates_text(engine: Engine) -> None:
    context = random_ids(20, seed=34)
    free_run = engine.generate(None, context, SamplingParams(max_tokens=12, ignore_eos=True))
    text = free_run.text
    assert len(text) > 4
    stop = text[2:4]
    stopped = engine.generate(None, context, SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop,)))
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop)
    assert stopped.text == text[: text.index(stop)]
    assert stopped.token_ids == free_run.token_ids[: len(stopped.token_ids)]
