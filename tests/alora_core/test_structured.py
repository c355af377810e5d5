"""Constrained decoding (structured outputs) in the batched engine.

Outputs are checked against their constraint with independent validators (jsonschema, re, Lark's own
rule written as a regex); greedy constrained tokens against the Hugging Face / PEFT model stepped
one token at a time with a separate llguidance matcher masking its logits (a transformers
LogitsProcessor), so nothing of the engine's batching, mask unpacking or state keeping is shared.
"""

import json
import re

import jsonschema
import llguidance
import llguidance.hf
import numpy as np
import pytest
import torch
from transformers import LogitsProcessor

from alora_core import Engine, SamplingParams
from alora_core.errors import InvalidRequestError
from alora_core.structured import MAX_CONSTRAINT_BYTES, OutputConstraint
from tests.alora_core.conftest import PeftOracle, random_ids
from tests.alora_core.references import reference_greedy

NESTED = {
    "type": "object",
    "properties": {
        "certainty": {"type": "number", "minimum": 0, "maximum": 1},
        "label": {"enum": ["yes", "no", "unsure"]},
        "spans": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"begin": {"type": "integer"}, "end": {"type": "integer"}},
                "required": ["begin", "end"],
            },
            "maxItems": 3,
        },
    },
    "required": ["certainty", "label", "spans"],
}
ARRAY = {
    "type": "array",
    "items": {"type": "string", "pattern": "^[a-z]{1,6}$"},
    "minItems": 1,
    "maxItems": 4,
}
REGEX = r"(yes|no), [0-9]{1,3}"
CHOICES = ["answerable", "unanswerable", "partially answerable"]
LARK = 'start: "(" expr ")"\nexpr: NUM (OP NUM)*\nOP: "+" | "-"\nNUM: /[0-9]{1,2}/'
LARK_AS_REGEX = r"\([0-9]{1,2}([+-][0-9]{1,2})*\)"

CASES = {
    "nested_object": (
        OutputConstraint.json_schema(NESTED),
        lambda t: jsonschema.validate(json.loads(t), NESTED),
    ),
    "array": (OutputConstraint.json_schema(ARRAY), lambda t: jsonschema.validate(json.loads(t), ARRAY)),
    "regex": (OutputConstraint("regex", REGEX), lambda t: _full(REGEX, t)),
    "choice": (OutputConstraint.choice(CHOICES), lambda t: _check(t in CHOICES, t)),
    "lark": (OutputConstraint("grammar", LARK), lambda t: _full(LARK_AS_REGEX, t)),
}


def _full(pattern: str, text: str) -> None:
    _check(re.fullmatch(pattern, text) is not None, text)


def _check(ok: bool, text: str) -> None:
    if not ok:
        raise AssertionError(f"output does not match its constraint: {text!r}")


class IndependentMask(LogitsProcessor):
    """transformers processor: a fresh llguidance matcher of the schema masks each step's scores."""

    def __init__(self, engine: Engine, prompt_len: int, grammar: str) -> None:
        tok = llguidance.hf.from_tokenizer(
            engine.tokenizer,
            n_vocab=engine.loaded.shape.vocab_size,
            eos_token=list(engine.loaded.eos_token_ids),
        )
        self.matcher = llguidance.LLMatcher(tok, grammar)
        assert not self.matcher.is_error(), self.matcher.get_error()
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] > self.prompt_len:
            assert self.matcher.consume_token(int(input_ids[0, -1]))
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.from_numpy(bits[: scores.shape[1]].astype(bool))
        return scores.masked_fill(~allowed[None], float("-inf"))


def json_grammar(schema: dict) -> str:
    closed = json.loads(json.dumps(schema).replace('"required"', '"additionalProperties": false, "required"'))
    return llguidance.LLMatcher.grammar_from_json_schema(
        closed, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    )


def prompt_for(engine: Engine, adapter: str | None, seed: int) -> list[int]:
    prompt = random_ids(20, seed=seed)
    if adapter is not None and engine.adapters.get(adapter).spec.kind == "alora":
        prompt += list(engine.adapters.get(adapter).spec.invocation_tokens or ())
    return prompt


@pytest.mark.parametrize("adapter", [None, "rewrite", "certainty"])
def test_constrained_greedy_equals_peft_with_an_independent_mask(
    engine: Engine, oracle: PeftOracle, adapter: str | None
) -> None:
    prompt = prompt_for(engine, adapter, seed=1700)
    params = SamplingParams(max_tokens=60, constraint=OutputConstraint.json_schema(NESTED))
    result = engine.submit_completion(adapter, prompt, params).result(timeout=120)
    mask = IndependentMask(engine, len(prompt), json_grammar(NESTED))
    expected, _ = reference_greedy(oracle, adapter, prompt, 60, [mask], engine.loaded.eos_token_ids)
    assert result.token_ids == expected
    assert result.finish_reason == "stop"
    jsonschema.validate(json.loads(result.text), NESTED)
    free, _ = reference_greedy(oracle, adapter, prompt, 10, [], engine.loaded.eos_token_ids)
    assert free[:10] != expected[:10]  # the mask changed the answer (random weights: never valid JSON)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_every_output_validates_greedy_and_sampled(engine: Engine, case: str) -> None:
    """Base, LoRA and aLoRA rows, greedy and 8 seeds each, all in flight together."""
    constraint, check = CASES[case]
    handles = []
    for a, adapter in enumerate([None, "rewrite", "certainty"]):
        for seed in range(9):
            params = SamplingParams(
                max_tokens=120,
                temperature=0.0 if seed == 0 else 1.0,
                seed=seed,
                constraint=constraint,
            )
            handles.append(engine.submit_completion(adapter, prompt_for(engine, adapter, 1710 + a), params))
    results = [h.result(timeout=300) for h in handles]
    for r in results:
        if r.finish_reason == "stop":
            check(r.text)
    stopped = sum(r.finish_reason == "stop" for r in results)
    assert stopped >= 0.9 * len(results), [(r.finish_reason, r.text) for r in results]


def test_n_choices_each_follow_their_own_matcher(engine: Engine) -> None:
    constraint, check = CASES["nested_object"]
    params = SamplingParams(max_tokens=120, temperature=1.0, seed=3, n=4, constraint=constraint)
    choices = [
        c.result(timeout=120) for c in engine.submit_completion(None, random_ids(18, 1720), params).choices
    ]
    for r in choices:
        assert r.finish_reason == "stop"
        check(r.text)
    assert len({r.text for r in choices}) > 1
    solo = engine.generate(None, random_ids(18, 1720), SamplingParams(**{**vars(params), "n": 1, "seed": 5}))
    assert solo.token_ids == choices[2].token_ids  # choice i samples with seed + i, like a solo request


def test_constrained_and_free_rows_in_one_batch_equal_their_solo_runs(make_engine) -> None:
    engine = make_engine()
    schema = OutputConstraint.json_schema(NESTED)
    requests = [
        (None, prompt_for(engine, None, 1730), SamplingParams(max_tokens=40, constraint=schema)),
        (
            "certainty",
            prompt_for(engine, "certainty", 1731),
            SamplingParams(max_tokens=40, constraint=schema),
        ),
        ("rewrite", prompt_for(engine, "rewrite", 1732), SamplingParams(max_tokens=40, ignore_eos=True)),
        (None, prompt_for(engine, None, 1733), SamplingParams(max_tokens=40, temperature=1.0, seed=9)),
        (
            "rewrite",
            prompt_for(engine, "rewrite", 1734),
            SamplingParams(max_tokens=40, temperature=1.0, seed=4, constraint=CASES["regex"][0]),
        ),
    ]
    solo = [engine.submit_completion(a, p, s).result(timeout=120).token_ids for a, p, s in requests]
    batched = [engine.submit_completion(a, p, s) for a, p, s in requests]
    assert [h.result(timeout=120).token_ids for h in batched] == solo


def test_logprobs_are_computed_after_the_mask(engine: Engine) -> None:
    constraint = CASES["choice"][0]
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=2, logprobs=5, constraint=constraint)
    r = engine.generate(None, random_ids(16, 1740), params)
    assert r.finish_reason == "stop" and r.text in CHOICES and r.logprobs is not None
    tokens = r.token_ids[:-1]  # the last one is EOS
    assert engine.tokenizer.decode(tokens) == r.text
    matcher = IndependentMask(
        engine,
        0,
        llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in CHOICES)),
    ).matcher
    for token, entry in zip(r.token_ids, r.logprobs, strict=True):
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = {int(t) for t in np.flatnonzero(bits[: engine.loaded.shape.vocab_size])}
        finite = {t: lp for t, lp in entry.top if lp > float("-inf")}
        assert set(finite) <= allowed and len(finite) == min(5, len(allowed))
        assert entry.logprob > float("-inf")
        if len(allowed) <= 5:  # the whole allowed mass is in the top: it sums to one
            assert sum(np.exp(list(finite.values()))) == pytest.approx(1.0, abs=1e-4)
        if token not in engine.loaded.eos_token_ids:
            assert matcher.consume_token(token)


def test_stop_string_ends_a_constrained_output(engine: Engine) -> None:
    constraint = OutputConstraint("regex", "abc(de)+fgh")
    r = engine.generate(
        None, random_ids(16, 1750), SamplingParams(max_tokens=30, stop=("ef",), constraint=constraint)
    )
    assert r.finish_reason == "stop" and re.fullmatch("abc(de)*d", r.text)
    assert engine.loaded.eos_token_ids[0] not in r.token_ids  # it ended at the stop string


def test_preempted_constrained_requests_replay_exactly(make_engine) -> None:
    constraint = OutputConstraint.json_schema(ARRAY)
    prompts = [random_ids(40 + 7 * i, seed=1760 + i) for i in range(5)]
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=7, constraint=constraint)
    roomy = make_engine(max_num_seqs=1)
    expected = [roomy.generate(None, p, params).token_ids for p in prompts]
    tight = make_engine(num_blocks=12, max_num_batched_tokens=64)
    handles = [tight.submit_completion(None, p, params) for p in prompts]
    assert [h.result(timeout=120).token_ids for h in handles] == expected
    assert tight.scheduler.preemptions > 0


def test_a_dead_end_ends_only_that_request_with_an_error(engine: Engine) -> None:
    dead = SamplingParams(max_tokens=30, min_tokens=20, constraint=OutputConstraint.choice(["yes", "no"]))
    free = SamplingParams(max_tokens=12, ignore_eos=True)
    prompt = random_ids(16, 1770)
    expected = engine.generate(None, prompt, free).token_ids
    handles = [engine.submit_completion(None, prompt, dead), engine.submit_completion(None, prompt, free)]
    bad, good = (h.result(timeout=60) for h in handles)
    assert bad.finish_reason == "error" and bad.error and bad.text in ("yes", "no")
    assert good.token_ids == expected
    assert engine.generate(None, prompt, free).token_ids == expected


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        (
            OutputConstraint.json_schema({"type": "object", "properties": {"a": {"type": "nonsense"}}}),
            "json_schema",
        ),
        (OutputConstraint("regex", "(ab"), "regex"),
        (OutputConstraint("grammar", 'start: "a" missing_rule'), "grammar"),
        (OutputConstraint("regex", "a" * (MAX_CONSTRAINT_BYTES + 1)), "bytes"),
        (OutputConstraint.choice([]), "choice"),
    ],
)
def test_bad_constraints_are_refused_before_any_work(
    engine: Engine, constraint: OutputConstraint, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        engine.submit_completion(
            None, random_ids(8, 1780), SamplingParams(max_tokens=4, constraint=constraint)
        )
    assert engine.scheduler.num_waiting == 0 and not engine.scheduler.running
    r = engine.generate(
        None, random_ids(8, 1780), SamplingParams(max_tokens=20, constraint=CASES["choice"][0])
    )
    assert r.text in CHOICES


def test_ignore_eos_with_a_constraint_is_refused(engine: Engine) -> None:
    with pytest.raises(InvalidRequestError, match="ignore_eos"):
        engine.generate(
            None, [5, 6], SamplingParams(max_tokens=4, ignore_eos=True, constraint=CASES["regex"][0])
        )


def test_grammars_are_compiled_once_per_constraint(engine: Engine) -> None:
    before = engine.grammars.stats.compiled
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    for _ in range(3):
        engine.generate(
            None, [5, 6, 7], SamplingParams(max_tokens=20, constraint=OutputConstraint.json_schema(schema))
        )
    assert engine.grammars.stats.compiled == before + 1 and engine.grammars.stats.hits >= 2
