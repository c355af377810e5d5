"""The OpenAI routes against PEFT / transformers on the same weights, through the real openai SDK:
greedy tokens equal `PeftModel.generate`, logprobs equal the oracle's log-softmax (raw logprobs).

Block size 16: prompt lengths inside one block, exactly two blocks, and across blocks (not a multiple)."""

import openai
import pytest
import torch
from transformers import PreTrainedTokenizerBase

from tests.alora_core.conftest import PeftOracle, random_ids
from tests.service.conftest import ServerProcess
from tests.service.openai.conftest import SERVED, chat_ids, invocation

LOGPROB_ATOL = 1e-4
MAX_TOKENS = 6


@torch.inference_mode()
def oracle_logprobs(oracle: PeftOracle, adapter: str | None, tokens: list[int]) -> torch.Tensor:
    """log_softmax of the oracle's logits at every position of `tokens`: [len, V]."""
    logits = oracle.model(adapter)(input_ids=torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("adapter", [None, "certainty", "answerability", "rewrite"])
@pytest.mark.parametrize("length", [7, 32, 45])
def test_greedy_completion_of_token_ids_equals_peft_with_its_logprobs(
    sdk: openai.OpenAI, openai_server: ServerProcess, oracle: PeftOracle, adapter: str | None, length: int
) -> None:
    prompt = random_ids(length, seed=1700 + length)
    if adapter in ("certainty", "answerability"):  # an aLoRA prompt holds its invocation
        prompt = prompt + invocation(openai_server, adapter)
    response = sdk.completions.create(
        model=adapter or SERVED,
        prompt=prompt,
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=5,
        extra_body={"return_token_ids": True},
    )
    choice = response.choices[0]
    expected, _ = oracle.generate(adapter, prompt, MAX_TOKENS)
    tokens = choice.model_extra["token_ids"]
    assert tokens == expected
    assert choice.model_extra["prompt_token_ids"] == prompt
    assert response.model == (adapter or SERVED)
    assert response.usage.prompt_tokens == len(prompt)
    assert response.usage.completion_tokens == len(tokens)

    reference = oracle_logprobs(oracle, adapter, prompt + tokens)[len(prompt) - 1 : -1]  # [n, V]
    logprobs = choice.logprobs
    assert logprobs is not None and len(logprobs.token_logprobs) == len(tokens)
    for i, token in enumerate(tokens):
        assert logprobs.token_logprobs[i] == pytest.approx(float(reference[i, token]), abs=LOGPROB_ATOL)
        top = logprobs.top_logprobs[i]
        assert top is not None and len(top) <= 6  # the top 5 and the token itself (decoded keys)
        values, ids = reference[i].topk(5)
        expected: dict[str, float] = {}
        for t, v in zip(ids.tolist(), values.tolist(), strict=True):
            expected.setdefault(oracle.tokenizer.decode([t]), v)
        assert set(expected) <= set(top)
        for key, value in top.items():
            want = float(reference[i, token]) if key == logprobs.tokens[i] else expected[key]
            assert value == pytest.approx(want, abs=LOGPROB_ATOL), key
    text = "".join(logprobs.tokens)
    assert text.startswith(choice.text)  # the token strings spell the text (a final EOS may follow)


@pytest.mark.parametrize("adapter", ["certainty", "rewrite"])
def test_chat_logprobs_are_the_oracle_log_softmax_and_spell_the_text(
    sdk: openai.OpenAI,
    openai_server: ServerProcess,
    oracle: PeftOracle,
    tokenizer: PreTrainedTokenizerBase,
    adapter: str,
) -> None:
    messages = [{"role": "user", "content": "What is the weather like in the city today?"}]
    response = sdk.chat.completions.create(
        model=adapter,
        messages=messages,
        max_completion_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=4,
        extra_body={"return_token_ids": True},
    )
    prompt = response.model_extra["prompt_token_ids"]
    if adapter == "certainty":  # the invocation took the generation prompt's place
        assert prompt == chat_ids(tokenizer, messages, generation_prompt=False) + invocation(
            openai_server, adapter
        )
    else:
        assert prompt == chat_ids(tokenizer, messages)
    choice = response.choices[0]
    tokens = choice.model_extra["token_ids"]
    expected, _ = oracle.generate(adapter, prompt, 8)
    assert tokens == expected
    reference = oracle_logprobs(oracle, adapter, prompt + tokens)[len(prompt) - 1 : -1]
    content = choice.logprobs.content
    assert len(content) == len(tokens)
    for i, (entry, token) in enumerate(zip(content, tokens, strict=True)):
        assert entry.logprob == pytest.approx(float(reference[i, token]), abs=LOGPROB_ATOL)
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert values == pytest.approx(reference[i].topk(4).values.tolist(), abs=LOGPROB_ATOL)
        assert entry.bytes == list(entry.token.encode())
    spelled = "".join(e.token for e in content)
    eos = tokenizer.eos_token
    assert spelled == choice.message.content or (
        choice.finish_reason == "stop" and spelled == choice.message.content + eos
    )


def test_the_token_that_ends_a_choice_is_shown_as_itself(
    sdk: openai.OpenAI, tokenizer: PreTrainedTokenizerBase
) -> None:
    eos = tokenizer.eos_token_id
    response = sdk.chat.completions.create(
        model=SERVED,
        messages=[{"role": "user", "content": "Say two words."}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        extra_body={"min_tokens": 2, "logit_bias": {str(eos): 100}},  # ends right after min_tokens
    )
    choice = response.choices[0]
    tokens = [e.token for e in choice.logprobs.content]
    assert choice.finish_reason == "stop" and len(tokens) == 3
    assert tokens[-1] == tokenizer.eos_token  # as vLLM shows it
    assert "".join(tokens[:-1]) == choice.message.content
