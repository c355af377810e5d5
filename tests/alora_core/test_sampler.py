"""The batched sampler's fields against transformers' logits processors (or a torch reference where
transformers has none), with vLLM's semantics and order:

    raw logits -> logprobs (raw) ; min_tokens -> logit_bias -> repetition / frequency / presence -> argmax
    random: / temperature -> min_p -> top_k -> top_p

References run the Hugging Face model step by step on the growing sequence (full recompute), so they
share nothing with the engine but the weights.
"""

import threading

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from alora_core import Engine, SamplingParams
from alora_core.sampling import warp
from alora_core.step import Work
from tests.alora_core.conftest import PeftOracle, random_ids
from tests.alora_core.references import OpenAIPenalties, OutputOnly, PromptOnly, reference_greedy

LOGPROB_ATOL = 1e-4


def eos(engine: Engine) -> tuple[int, ...]:
    return engine.loaded.eos_token_ids


def repetitive_prompt(engine: Engine) -> list[int]:
    """A prompt holding tokens the model says next (16 random ids + their greedy continuation)."""
    base = random_ids(16, seed=1607)
    return base + engine.generate(None, base, SamplingParams(max_tokens=10, ignore_eos=True)).token_ids


@pytest.mark.parametrize("case", ["prompt_repeats", "output_repeats"])
def test_repetition_penalty_counts_prompt_and_output_like_transformers(
    engine: Engine, oracle: PeftOracle, case: str
) -> None:
    # the first prompt holds what the model says next; the second one's plain output repeats itself
    prompt = repetitive_prompt(engine) if case == "prompt_repeats" else random_ids(16, seed=1604)
    params = SamplingParams(max_tokens=12, repetition_penalty=1.8, ignore_eos=True)
    result = engine.generate(None, prompt, params)
    expected, _ = reference_greedy(oracle, None, prompt, 12, [RepetitionPenaltyLogitsProcessor(1.8)], ())
    wrong_rule = OutputOnly if case == "prompt_repeats" else PromptOnly
    wrong, _ = reference_greedy(
        oracle, None, prompt, 12, [wrong_rule(len(prompt), RepetitionPenaltyLogitsProcessor(1.8))], ()
    )
    assert expected != wrong  # a penalty that missed the prompt (or the output) would be visible here
    assert result.token_ids == expected


def test_presence_and_frequency_penalties_count_generated_tokens_only(
    engine: Engine, oracle: PeftOracle
) -> None:
    prompt = repetitive_prompt(engine)
    params = SamplingParams(max_tokens=14, presence_penalty=1.2, frequency_penalty=1.5, ignore_eos=True)
    result = engine.generate(None, prompt, params)
    expected, _ = reference_greedy(oracle, None, prompt, 14, [OpenAIPenalties(len(prompt), 1.2, 1.5)], ())
    wrong, _ = reference_greedy(
        oracle, None, prompt, 14, [OpenAIPenalties(len(prompt), 1.2, 1.5, count_prompt=True)], ()
    )
    assert expected != wrong  # counting the prompt too would be visible here
    assert result.token_ids == expected
    plain = engine.generate(None, prompt, SamplingParams(max_tokens=14, ignore_eos=True))
    assert plain.token_ids != expected


def test_logit_bias_matches_transformers_sequence_bias(engine: Engine, oracle: PeftOracle) -> None:
    prompt = random_ids(20, seed=1603)
    plain = engine.generate(None, prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    bias = {plain.token_ids[0]: -100.0, plain.token_ids[2]: -3.0, 77: 4.0, 123: 2.5}
    params = SamplingParams(max_tokens=8, ignore_eos=True, logit_bias=tuple(bias.items()))
    result = engine.generate(None, prompt, params)
    processor = SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()})
    expected, _ = reference_greedy(oracle, None, prompt, 8, [processor], ())
    assert result.token_ids == expected
    assert result.token_ids[0] != plain.token_ids[0]


def test_min_tokens_suppresses_eos_and_stop_ids(engine: Engine, oracle: PeftOracle) -> None:
    prompt = random_ids(18, seed=1604)
    free = engine.generate(None, prompt, SamplingParams(max_tokens=10, ignore_eos=True))
    stop_id = free.token_ids[0]  # stops at once without min_tokens
    stop_ids = (stop_id, *eos(engine))
    early = engine.generate(None, prompt, SamplingParams(max_tokens=10, stop_token_ids=(stop_id,)))
    assert early.token_ids == [stop_id] and early.finish_reason == "stop"

    params = SamplingParams(max_tokens=10, stop_token_ids=(stop_id,), min_tokens=4)
    result = engine.generate(None, prompt, params)
    processor = MinNewTokensLengthLogitsProcessor(len(prompt), 4, list(stop_ids))
    expected, _ = reference_greedy(oracle, None, prompt, 10, [processor], stop_ids)
    assert result.token_ids == expected
    assert len(result.token_ids) >= 4 and not set(result.token_ids[:4]) & set(stop_ids)


def test_fields_combine_in_vllm_order(engine: Engine, oracle: PeftOracle) -> None:
    """min_tokens, then logit_bias, then repetition, then frequency / presence; on an aLoRA too."""
    invocation = list(engine.adapters.get("certainty").spec.invocation_tokens or ())
    prompt = random_ids(26, seed=1605) + invocation
    bias = {101: 2.0, 202: -1.0, 303: 3.0}
    params = SamplingParams(
        max_tokens=10,
        min_tokens=3,
        logit_bias=tuple(bias.items()),
        repetition_penalty=1.4,
        presence_penalty=0.7,
        frequency_penalty=0.9,
    )
    result = engine.intrinsic("certainty", None, prompt, params)
    processors = [
        MinNewTokensLengthLogitsProcessor(len(prompt), 3, list(eos(engine))),
        SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()}),
        RepetitionPenaltyLogitsProcessor(1.4),
        OpenAIPenalties(len(prompt), 0.7, 0.9),
    ]
    expected, _ = reference_greedy(oracle, "certainty", prompt, 10, processors, eos(engine))
    assert result.token_ids == expected


@pytest.mark.parametrize(
    ("params", "warpers"),
    [
        (SamplingParams(temperature=0.7, min_p=0.05), [TemperatureLogitsWarper(0.7), MinPLogitsWarper(0.05)]),
        (SamplingParams(temperature=1.3, top_k=7), [TemperatureLogitsWarper(1.3), TopKLogitsWarper(7)]),
        (SamplingParams(temperature=1.0, top_p=0.6), [TemperatureLogitsWarper(1.0), TopPLogitsWarper(0.6)]),
    ],
    ids=["min_p", "top_k", "top_p"],
)
def test_random_sampling_scores_match_transformers_warpers(params: SamplingParams, warpers: list) -> None:
    logits = torch.randn(1, 500, generator=torch.Generator().manual_seed(7))
    expected = LogitsProcessorList(warpers)(torch.zeros(1, 1, dtype=torch.long), logits.clone())[0]
    scores = warp(logits[0], params)
    kept = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(scores), kept)
    assert 1 < int(kept.sum()) < 500  # the field dropped some tokens and kept several
    torch.testing.assert_close(scores[kept], expected[kept])


def test_min_p_draws_only_tokens_it_keeps(engine: Engine) -> None:
    prompt = random_ids(20, seed=1606)
    raw = engine.generate(None, prompt, SamplingParams(max_tokens=1, return_logits=True)).logits
    assert raw is not None
    probs = torch.softmax(raw[0], -1)
    allowed = set((probs >= 0.3 * probs.max()).nonzero().flatten().tolist())
    draws = {
        engine.generate(
            None, prompt, SamplingParams(max_tokens=1, temperature=1.0, min_p=0.3, seed=s)
        ).token_ids[0]
        for s in range(40)
    }
    free = {
        engine.generate(None, prompt, SamplingParams(max_tokens=1, temperature=1.0, seed=s)).token_ids[0]
        for s in range(40)
    }
    assert draws <= allowed
    assert not free <= allowed  # without min_p the draws leave that set


def test_logprobs_are_raw_log_softmax_before_bias_penalties_and_temperature(
    engine: Engine, oracle: PeftOracle
) -> None:
    prompt = random_ids(21, seed=1607)
    params = SamplingParams(
        max_tokens=7,
        temperature=1.7,
        seed=3,
        logit_bias=((55, 3.0),),
        presence_penalty=1.0,
        logprobs=5,
        ignore_eos=True,
    )
    result = engine.generate(None, prompt, params)
    assert result.logprobs is not None and len(result.logprobs) == 7
    with torch.inference_mode():
        logits = oracle.model(None)(input_ids=torch.tensor([prompt + result.token_ids])).logits[0].float()
    reference = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)  # [7, V]: raw, as vLLM reports
    for i, (token, entry) in enumerate(zip(result.token_ids, result.logprobs, strict=True)):
        assert entry.logprob == pytest.approx(float(reference[i, token]), abs=LOGPROB_ATOL)
        above = reference[i] - reference[i, token]
        assert (
            1 + int((above > LOGPROB_ATOL).sum()) <= entry.rank <= 1 + int((above > -LOGPROB_ATOL).sum()) - 1
        )
        top_ids = [t for t, _ in entry.top]
        assert len(top_ids) == 5
        assert top_ids == reference[i].topk(5).indices.tolist()
        values = [v for _, v in entry.top]
        assert values == sorted(values, reverse=True)
        torch.testing.assert_close(
            torch.tensor(values), reference[i].topk(5).values, atol=LOGPROB_ATOL, rtol=0
        )


def test_prompt_logprobs_score_every_prompt_token_and_skip_the_cache(
    engine: Engine, oracle: PeftOracle
) -> None:
    history = random_ids(40, seed=1608)
    engine.generate("c", history, SamplingParams(max_tokens=2, ignore_eos=True))
    prompt = engine.conversation_tokens("c") + random_ids(5, seed=1609)
    result = engine.generate("c", prompt, SamplingParams(max_tokens=2, prompt_logprobs=3))
    assert result.usage.cached_tokens == 0  # reusing cached KV would leave those positions unscored
    assert result.prompt_logprobs is not None and len(result.prompt_logprobs) == len(prompt) - 1
    with torch.inference_mode():
        logits = oracle.model(None)(input_ids=torch.tensor([prompt])).logits[0].float()
    reference = torch.log_softmax(logits[:-1], -1)
    for q, entry in enumerate(result.prompt_logprobs):
        assert entry.logprob == pytest.approx(float(reference[q, prompt[q + 1]]), abs=LOGPROB_ATOL)
        assert [t for t, _ in entry.top] == reference[q].topk(3).indices.tolist()


def test_prompt_logprobs_across_prefill_chunks(make_engine, oracle: PeftOracle) -> None:
    engine = make_engine(prefill_chunk_tokens=16, max_num_batched_tokens=16)
    prompt = random_ids(45, seed=1610)
    result = engine.generate(None, prompt, SamplingParams(max_tokens=1, prompt_logprobs=0))
    with torch.inference_mode():
        logits = oracle.model(None)(input_ids=torch.tensor([prompt])).logits[0].float()
    reference = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert result.prompt_logprobs is not None
    got = torch.tensor([e.logprob for e in result.prompt_logprobs])
    torch.testing.assert_close(got, reference, atol=LOGPROB_ATOL, rtol=0)


def fed_positions(engine: Engine) -> list[tuple[int, int, int]]:
    """(id of the sequence, start, end) of every work item the scheduler runs from now on."""
    seen: list[tuple[int, int, int]] = []
    lock = threading.Lock()

    def observe(work: list[Work]) -> None:
        with lock:
            seen.extend((id(seq), start, end) for seq, start, end in work)

    engine.scheduler.step_observers.append(observe)
    return seen


def test_n_choices_prefill_once_and_fork(engine: Engine) -> None:
    prompt = random_ids(37, seed=1611)
    seen = fed_positions(engine)
    handle = engine.submit_completion(
        None, prompt, SamplingParams(max_tokens=5, n=4, temperature=1.0, seed=11)
    )
    choices = [h.result() for h in handle.choices]
    prompt_feeds = [(start, end) for _, start, end in seen if start < len(prompt)]
    assert sum(end - start for start, end in prompt_feeds) == len(prompt)  # computed once, for all four
    assert len({id_ for id_, _, _ in seen}) == 4
    # each choice samples like a lone request with seed + index: reproducible, different from the others
    for i, choice in enumerate(choices):
        alone = engine.submit_completion(
            None, prompt, SamplingParams(max_tokens=5, temperature=1.0, seed=11 + i)
        )
        assert choice.token_ids == alone.result().token_ids
    assert len({tuple(c.token_ids) for c in choices}) == 4
    assert all(c.usage.prompt_tokens == len(prompt) for c in choices)


def test_n_greedy_choices_equal_and_a_choice_without_kv_recomputes(make_engine) -> None:
    engine = make_engine(num_blocks=4, block_size=16)  # the prompt takes 3 blocks: no room to fork
    prompt = random_ids(40, seed=1612)
    single = engine.submit_completion(None, prompt, SamplingParams(max_tokens=6, ignore_eos=True)).result()
    handle = engine.submit_completion(
        None, prompt, SamplingParams(max_tokens=6, n=3, ignore_eos=True, logprobs=1)
    )
    for choice in (h.result() for h in handle.choices):
        assert choice.token_ids == single.token_ids
        assert choice.logprobs is not None and len(choice.logprobs) == 6


def test_cancelling_a_parent_before_its_first_token_fails_its_choices(make_engine) -> None:
    engine = make_engine(max_num_seqs=1)
    blocker = engine.submit_completion(
        None, random_ids(10, seed=1613), SamplingParams(max_tokens=40, ignore_eos=True)
    )
    handle = engine.submit_completion(None, random_ids(10, seed=1614), SamplingParams(max_tokens=3, n=3))
    handle.cancel()  # still waiting behind the blocker
    for choice in handle.choices:
        with pytest.raises(Exception, match="cancelled"):
            choice.result(timeout=30)
    assert blocker.result().finish_reason == "length"


def test_mixed_fields_in_one_batch_equal_solo_runs(engine: Engine) -> None:
    invocation = list(engine.adapters.get("certainty").spec.invocation_tokens or ())
    cases = [
        (None, random_ids(30, seed=1620), SamplingParams(max_tokens=8, repetition_penalty=1.5)),
        (None, random_ids(17, seed=1621), SamplingParams(max_tokens=8, temperature=1.2, seed=5, min_p=0.1)),
        ("certainty", random_ids(25, seed=1622) + invocation, SamplingParams(max_tokens=8, logprobs=2)),
        ("rewrite", random_ids(33, seed=1623), SamplingParams(max_tokens=8, logit_bias=((9, 4.0),))),
        (None, random_ids(12, seed=1624), SamplingParams(max_tokens=8, presence_penalty=2.0, min_tokens=8)),
        (None, random_ids(22, seed=1625), SamplingParams(max_tokens=8, n=2, temperature=0.8, seed=1)),
    ]
    solo = [[h.result() for h in engine.submit_completion(a, p, s).choices] for a, p, s in cases]
    handles = [engine.submit_completion(a, p, s) for a, p, s in cases]
    together = [[h.result() for h in handle.choices] for handle in handles]
    for alone, batched in zip(solo, together, strict=True):
        assert [r.token_ids for r in alone] == [r.token_ids for r in batched]
        for a, b in zip(alone, batched, strict=True):
            if a.logprobs is None:
                assert b.logprobs is None
                continue
            assert b.logprobs is not None
            got = torch.tensor([[e.logprob, *(v for _, v in e.top)] for e in b.logprobs])
            want = torch.tensor([[e.logprob, *(v for _, v in e.top)] for e in a.logprobs])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_n_choices_take_their_seats_of_max_num_seqs(make_engine) -> None:
    """An n > 1 request is admitted only where its choices fit beside what runs (they fork from it at
    its first token), so no step runs more than max_num_seqs sequences; requests behind it wait their
    turn; one with more choices than max_num_seqs runs alone rather than never."""
    engine = make_engine(max_num_seqs=4)
    widest: list[int] = []
    engine.scheduler.step_observers.append(lambda work: widest.append(len({id(seq) for seq, _, _ in work})))
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    blocker = engine.submit_completion(None, random_ids(10, seed=1621), greedy)
    wide = engine.submit_completion(None, random_ids(10, seed=1622), SamplingParams(max_tokens=3, n=4))
    behind = engine.submit_completion(None, random_ids(10, seed=1623), SamplingParams(max_tokens=3))
    assert blocker.result().finish_reason == "length"
    assert all(len(h.result().token_ids) == 3 for h in [*wide.choices, behind])
    assert max(widest) == 4
    widest.clear()
    alone = engine.submit_completion(None, random_ids(10, seed=1624), SamplingParams(max_tokens=3, n=6))
    assert all(len(h.result().token_ids) == 3 for h in alone.choices)
    assert max(widest) == 6
