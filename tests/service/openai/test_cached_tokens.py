"""`usage.prompt_tokens_details.cached_tokens` of stateless OpenAI clients: they never send a
conversation id, so their prompts are reused only through the KV index (automatic prefix caching)."""

import openai
from transformers import PreTrainedTokenizerBase

from tests.alora_core.conftest import PeftOracle
from tests.service.conftest import ServerProcess
from tests.service.openai.conftest import SERVED, chat_ids, invocation

BLOCK = 16  # the server's --block-size (default)


def full_blocks(tokens: int) -> int:
    return tokens // BLOCK * BLOCK


def converse(
    sdk: openai.OpenAI, opening: str, turns: int, oracle: PeftOracle
) -> tuple[list[dict], list[int]]:
    """A stateless multi-turn chat (the whole history on every call); checks each turn's cache and
    output. Returns the messages and the last prompt's token ids."""
    messages: list[dict] = [{"role": "user", "content": opening}]
    previous = 0
    prompt: list[int] = []
    for turn in range(turns):
        response = sdk.chat.completions.create(
            model=SERVED,
            messages=messages,
            max_tokens=6,
            temperature=0,
            extra_body={"return_token_ids": True},
        )
        prompt = response.model_extra["prompt_token_ids"]
        cached = response.usage.prompt_tokens_details.cached_tokens
        assert cached >= full_blocks(previous), (turn, cached, previous)
        assert response.choices[0].model_extra["token_ids"] == oracle.generate(None, prompt, 6)[0]
        previous = len(prompt)
        messages += [
            {"role": "assistant", "content": response.choices[0].message.content},
            {"role": "user", "content": f"Tell me more about item {turn} of the list."},
        ]
    return messages, prompt


def test_stateless_multi_turn_chat_reuses_every_previous_full_block(
    sdk: openai.OpenAI, oracle: PeftOracle
) -> None:
    converse(sdk, "Explain the weather of the city and the river near it, " * 4, turns=4, oracle=oracle)


def test_alora_chat_on_the_history_reuses_the_base_prefix(
    sdk: openai.OpenAI, openai_server: ServerProcess, oracle: PeftOracle, tokenizer: PreTrainedTokenizerBase
) -> None:
    messages, last_prompt = converse(sdk, "What does the document say about memory and data? " * 4, 2, oracle)
    history = messages[:-1]  # through the last answer: what the base calls computed
    response = sdk.chat.completions.create(
        model="certainty",
        messages=history,
        max_tokens=4,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    conversation = chat_ids(tokenizer, history, generation_prompt=False)
    prompt = response.model_extra["prompt_token_ids"]
    assert prompt == conversation + invocation(openai_server, "certainty")
    assert conversation[: len(last_prompt)] == last_prompt
    assert response.usage.prompt_tokens_details.cached_tokens >= full_blocks(len(last_prompt))
    assert response.choices[0].model_extra["token_ids"] == oracle.generate("certainty", prompt, 4)[0]


def test_another_api_key_or_another_cache_salt_reuses_nothing(
    sdk: openai.OpenAI, sdk_b: openai.OpenAI, oracle: PeftOracle
) -> None:
    messages, _ = converse(sdk, "Which tool call answers the question about the agent? " * 4, 2, oracle)

    def cached(client: openai.OpenAI, **extra: object) -> int:
        response = client.chat.completions.create(
            model=SERVED, messages=messages, max_tokens=1, extra_body=extra or None
        )
        return response.usage.prompt_tokens_details.cached_tokens

    assert cached(sdk) > 0  # the same key reuses its own prefix
    assert cached(sdk_b) == 0  # another tenant never sees it
    assert cached(sdk, cache_salt="salt-1") == 0  # nor does a salted request
    assert cached(sdk, cache_salt="salt-1") > 0  # which reuses what the same salt computed


def test_prompt_logprobs_recompute_a_cached_prompt(sdk: openai.OpenAI, oracle: PeftOracle) -> None:
    messages, _ = converse(sdk, "Score every token of this prompt about the latency. " * 4, 2, oracle)
    again = sdk.chat.completions.create(model=SERVED, messages=messages, max_tokens=1)
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    scored = sdk.chat.completions.create(
        model=SERVED, messages=messages, max_tokens=1, extra_body={"prompt_logprobs": 1}
    )
    assert scored.usage.prompt_tokens_details.cached_tokens == 0
    assert len(scored.model_extra["prompt_logprobs"]) == scored.usage.prompt_tokens
