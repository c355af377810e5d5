"""Every accepted request field changes what it should, through the real openai SDK: sampling fields
against transformers' logits processors with vLLM's semantics (tests/alora_core/references.py),
template fields against the chat template rendered locally, the rest against the same request
without the field. Each test also shows the field is not ignored (the output differs without it)."""

from typing import Any

import openai
import pytest
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from tests.alora_core.conftest import PeftOracle, random_ids
from tests.alora_core.references import OpenAIPenalties, reference_greedy
from tests.service.conftest import ServerProcess
from tests.service.openai.conftest import ALIAS, MAX_MODEL_LEN, SERVED, chat_ids, invocation

EOS = 0  # <|end_of_text|> in the demo tokenizer


def complete(
    sdk: openai.OpenAI, prompt: list[int], model: str = SERVED, **fields: object
) -> tuple[list[int], str, str]:
    """(token ids, text, finish reason) of a greedy completion of token ids (fields override)."""
    choice = completion_choice(sdk, prompt, model, **fields)
    return choice.model_extra["token_ids"], choice.text, choice.finish_reason


def completion_choice(
    sdk: openai.OpenAI, prompt: list[int], model: str = SERVED, **fields: object
) -> openai.types.CompletionChoice:
    body: dict = {"temperature": 0, "max_tokens": 10, **fields}
    extra = {k: body.pop(k) for k in list(body) if k not in _SDK_FIELDS}
    response = sdk.completions.create(
        model=model, prompt=prompt, extra_body={"return_token_ids": True, **extra}, **body
    )
    return response.choices[0]


_SDK_FIELDS = {
    "temperature", "max_tokens", "top_p", "seed", "stop", "n", "logit_bias", "presence_penalty",
    "frequency_penalty", "logprobs", "echo", "user", "stream", "stream_options",
}  # fmt: skip


def repetitive_prompt(oracle: PeftOracle) -> list[int]:
    """16 random ids + their greedy continuation: a prompt holding tokens the model says next."""
    base = random_ids(16, seed=1607)
    return base + oracle.generate(None, base, 10)[0]


@pytest.mark.parametrize(
    "case", ["repetition", "presence", "frequency", "logit_bias", "min_tokens_stop_ids", "all_on_an_alora"]
)
def test_sampling_fields_equal_transformers_processors(
    sdk: openai.OpenAI, openai_server: ServerProcess, oracle: PeftOracle, case: str
) -> None:
    prompt, adapter, stop_ids = repetitive_prompt(oracle), None, (EOS,)
    plain_fields: dict = {"ignore_eos": True}
    if case == "repetition":
        fields, processors = {"repetition_penalty": 1.8}, [RepetitionPenaltyLogitsProcessor(1.8)]
    elif case == "presence":
        fields, processors = {"presence_penalty": 2.0}, [OpenAIPenalties(len(prompt), 2.0, 0.0)]
    elif case == "frequency":
        fields, processors = {"frequency_penalty": 1.5}, [OpenAIPenalties(len(prompt), 0.0, 1.5)]
    elif case == "logit_bias":
        first = oracle.generate(None, prompt, 1)[0][0]
        bias = {first: -100.0, 77: 4.0, 123: 2.5}
        fields = {"logit_bias": {str(t): b for t, b in bias.items()}}
        processors = [SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()})]
    elif case == "min_tokens_stop_ids":
        stop = oracle.generate(None, prompt, 1)[0][0]  # without min_tokens: stops at once
        fields, plain_fields = {"min_tokens": 4, "stop_token_ids": [stop]}, {"stop_token_ids": [stop]}
        stop_ids = (stop, EOS)
        processors = [MinNewTokensLengthLogitsProcessor(len(prompt), 4, list(stop_ids))]
    else:
        adapter = "certainty"
        prompt = prompt + invocation(openai_server, adapter)
        bias = {101: 2.0, 303: 3.0}
        fields = {
            "min_tokens": 3,
            "logit_bias": {str(t): b for t, b in bias.items()},
            "repetition_penalty": 1.4,
            "presence_penalty": 0.7,
            "frequency_penalty": 0.9,
        }
        plain_fields = {}
        processors = [
            MinNewTokensLengthLogitsProcessor(len(prompt), 3, [EOS]),
            SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()}),
            RepetitionPenaltyLogitsProcessor(1.4),
            OpenAIPenalties(len(prompt), 0.7, 0.9),
        ]
    if "stop_token_ids" not in fields and adapter is None:
        fields["ignore_eos"] = True
        stop_ids = ()
    tokens, _, _ = complete(sdk, prompt, adapter or SERVED, **fields)
    expected, _ = reference_greedy(oracle, adapter, prompt, 10, processors, stop_ids)
    assert tokens == expected
    plain, _, _ = complete(sdk, prompt, adapter or SERVED, **plain_fields)
    assert plain != tokens  # the field changed the output


def test_top_k_top_p_min_p_one_survivor_is_greedy_and_seed_fixes_the_draw(sdk: openai.OpenAI) -> None:
    prompt = random_ids(20, seed=1710)
    greedy, _, _ = complete(sdk, prompt, ignore_eos=True)
    hot = {"temperature": 5.0, "ignore_eos": True}
    free, _, _ = complete(sdk, prompt, seed=1, **hot)
    assert free != greedy  # temperature is not ignored
    for only_top in ({"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}):
        narrowed, _, _ = complete(sdk, prompt, seed=1, **hot, **only_top)
        assert narrowed == greedy, only_top
    assert complete(sdk, prompt, seed=1, **hot)[0] == free
    assert complete(sdk, prompt, seed=2, **hot)[0] != free


def test_stop_strings_and_stop_token_ids(sdk: openai.OpenAI) -> None:
    """What ends a choice, and vLLM's stop_reason saying which stop string or stop token id it was
    (null when nothing of the request's stopped it)."""
    prompt = random_ids(18, seed=1711)
    free = completion_choice(sdk, prompt, ignore_eos=True, max_tokens=12)
    tokens, text = free.model_extra["token_ids"], free.text
    assert (free.finish_reason, free.model_extra["stop_reason"]) == ("length", None)
    assert len(text) > 6
    stop = text[3:6]
    for form in (stop, [stop, "zzzz-never"], ["zzzz-never", text[4:7], stop]):
        choice = completion_choice(sdk, prompt, ignore_eos=True, max_tokens=12, stop=form)
        assert (choice.text, choice.finish_reason) == (text[: text.index(stop)], "stop")
        assert choice.model_extra["stop_reason"] == stop  # the earliest in the text, whatever the order
    choice = completion_choice(sdk, prompt, ignore_eos=True, max_tokens=12, stop_token_ids=[tokens[4]])
    assert choice.model_extra["token_ids"] == tokens[: tokens.index(tokens[4]) + 1]
    assert (choice.finish_reason, choice.model_extra["stop_reason"]) == ("stop", tokens[4])

    def chat(**fields: object) -> Any:
        return sdk.chat.completions.create(
            model=SERVED,
            messages=[{"role": "user", "content": "hi"}],
            temperature=0,
            max_tokens=12,
            extra_body={"ignore_eos": True},
            **fields,  # type: ignore[arg-type]
        )

    stop = chat().choices[0].message.content[2:5]
    assert len(stop) == 3
    stopped = chat(stop=[stop]).choices[0]
    assert (stopped.finish_reason, stopped.model_extra["stop_reason"]) == ("stop", stop)
    chunks = chat(stop=[stop], stream=True)
    finals = [c for chunk in chunks for c in chunk.choices if c.finish_reason is not None]
    assert [(f.finish_reason, f.model_extra["stop_reason"]) for f in finals] == [("stop", stop)]


def test_ignore_eos_and_max_tokens_absent_reach_the_context_limit(sdk: openai.OpenAI) -> None:
    prompt = random_ids(30, seed=1712)
    eos_first = {"logit_bias": {str(EOS): 100}}  # the model wants to end at once
    choice = completion_choice(sdk, prompt, **eos_first)
    assert (choice.model_extra["token_ids"], choice.finish_reason) == ([EOS], "stop")
    assert choice.model_extra["stop_reason"] is None  # the end-of-text token is no stop of the request
    response = sdk.completions.create(
        model=SERVED, prompt=prompt, temperature=0, extra_body={"ignore_eos": True, **eos_first}
    )  # no max_tokens: up to the context limit, as vLLM
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == MAX_MODEL_LEN - len(prompt)


def test_chat_template_fields_reach_the_template(
    sdk: openai.OpenAI, tokenizer: PreTrainedTokenizerBase
) -> None:
    messages = [
        {"role": "user", "content": "What is the weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]
    documents = [{"text": "The city is sunny.", "doc_id": "1"}, {"text": "It rains in May."}]

    def prompt_of(**extra: object) -> list[int]:
        response = sdk.chat.completions.create(
            model=SERVED,
            messages=messages,
            max_tokens=1,
            temperature=0,
            extra_body={"return_token_ids": True, **extra},
        )
        return response.model_extra["prompt_token_ids"]

    plain = prompt_of()
    assert plain == chat_ids(tokenizer, messages)  # tool_calls and the tool message reached it
    with_docs = prompt_of(documents=documents)
    assert with_docs == chat_ids(tokenizer, messages, documents=documents) != plain
    greeted = prompt_of(chat_template_kwargs={"greeting": "Hello!"})
    assert greeted == chat_ids(tokenizer, messages, greeting="Hello!") != plain
    no_prompt = prompt_of(add_generation_prompt=False)
    assert no_prompt == chat_ids(tokenizer, messages, generation_prompt=False) != plain


def test_continue_final_message_continues_it(
    sdk: openai.OpenAI, tokenizer: PreTrainedTokenizerBase, oracle: PeftOracle
) -> None:
    messages = [
        {"role": "user", "content": "Tell me about the river."},
        {"role": "assistant", "content": "The river"},
    ]
    response = sdk.chat.completions.create(
        model=SERVED,
        messages=messages,
        max_tokens=5,
        temperature=0,
        extra_body={"continue_final_message": True, "return_token_ids": True},
    )
    prompt = response.model_extra["prompt_token_ids"]
    assert prompt == chat_ids(tokenizer, messages, generation_prompt=False, continue_final_message=True)
    assert tokenizer.decode(prompt).endswith("The river")
    assert response.choices[0].model_extra["token_ids"] == oracle.generate(None, prompt, 5)[0]


def test_adapter_name_routes_like_model_and_never_reaches_the_template(
    sdk: openai.OpenAI, openai_server: ServerProcess, tokenizer: PreTrainedTokenizerBase
) -> None:
    messages = [{"role": "user", "content": "Is the answer in the document?"}]
    by_model = sdk.chat.completions.create(
        model="certainty",
        messages=messages,
        max_tokens=6,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    by_kwarg = sdk.chat.completions.create(
        model=ALIAS,
        messages=messages,
        max_tokens=6,
        temperature=0,
        extra_body={"return_token_ids": True, "chat_template_kwargs": {"adapter_name": "certainty"}},
    )
    base = sdk.chat.completions.create(
        model=SERVED, messages=messages, max_tokens=6, temperature=0, extra_body={"return_token_ids": True}
    )
    prompt = chat_ids(tokenizer, messages, generation_prompt=False) + invocation(openai_server, "certainty")
    assert by_kwarg.model_extra["prompt_token_ids"] == by_model.model_extra["prompt_token_ids"] == prompt
    assert by_kwarg.choices[0].model_extra["token_ids"] == by_model.choices[0].model_extra["token_ids"]
    assert by_kwarg.choices[0].model_extra["token_ids"] != base.choices[0].model_extra["token_ids"]
    assert (by_model.model, by_kwarg.model) == ("certainty", ALIAS)


def test_echo_prepends_the_prompt_and_its_logprobs(sdk: openai.OpenAI, oracle: PeftOracle) -> None:
    prompt = "Tell me about the weather in the city"
    plain = sdk.completions.create(model=SERVED, prompt=prompt, max_tokens=4, temperature=0, logprobs=1)
    echoed = sdk.completions.create(
        model=SERVED, prompt=prompt, max_tokens=4, temperature=0, logprobs=1, echo=True
    )
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    ids = oracle.tokenizer.encode(prompt)
    logprobs = echoed.choices[0].logprobs
    assert len(logprobs.tokens) == len(ids) + 4 and logprobs.token_logprobs[0] is None
    assert "".join(logprobs.tokens[: len(ids)]) == prompt
    # (cached KV: equal up to float rounding of another batch shape)
    plain_lps = plain.choices[0].logprobs.token_logprobs
    assert logprobs.token_logprobs[len(ids) :] == pytest.approx(plain_lps, abs=1e-4)
    only = sdk.completions.create(model=SERVED, prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert only.choices[0].text == prompt and only.usage.completion_tokens == 0
    prompt_lps = logprobs.token_logprobs[1 : len(ids)]
    assert only.choices[0].logprobs.token_logprobs[1:] == pytest.approx(prompt_lps, abs=1e-4)


def test_n_choices_are_reproducible_and_differ(sdk: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Say something about the data."}]
    seeded = {"model": SERVED, "messages": messages, "max_tokens": 8, "temperature": 1.5, "seed": 42}
    a = sdk.chat.completions.create(n=3, **seeded)
    b = sdk.chat.completions.create(n=3, **seeded)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) == 3
    # choice i samples as a lone request seeded seed + i (vLLM's rule)
    third = sdk.chat.completions.create(**{**seeded, "seed": 44})
    assert third.choices[0].message.content == texts[2]
    assert a.usage.prompt_tokens == third.usage.prompt_tokens  # the prompt counts once
    greedy = sdk.chat.completions.create(model=SERVED, messages=messages, max_tokens=8, temperature=0, n=2)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


def test_several_prompts_give_n_choices_each_in_order(sdk: openai.OpenAI) -> None:
    prompts = [random_ids(9, seed=1713), random_ids(21, seed=1714)]
    both = sdk.completions.create(model="rewrite", prompt=prompts, n=2, max_tokens=5, temperature=0)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    for p, prompt in enumerate(prompts):
        alone = sdk.completions.create(model="rewrite", prompt=prompt, max_tokens=5, temperature=0)
        assert both.choices[2 * p].text == both.choices[2 * p + 1].text == alone.choices[0].text
    assert both.usage.prompt_tokens == 30
    texts = ["Tell me about the river", "What is the city"]
    as_text = sdk.completions.create(model=SERVED, prompt=texts, max_tokens=3, temperature=0)
    for text, choice in zip(texts, as_text.choices, strict=True):
        assert (
            choice.text
            == sdk.completions.create(model=SERVED, prompt=text, max_tokens=3, temperature=0).choices[0].text
        )


def test_streaming_chunks_add_up_to_the_plain_response(sdk: openai.OpenAI) -> None:
    body = {
        "model": "certainty",
        "messages": [{"role": "user", "content": "Explain the memory of the model."}],
        "max_tokens": 12,
        "temperature": 0,
        "n": 2,
        "logprobs": True,
        "top_logprobs": 2,
        "extra_body": {"ignore_eos": True},
    }
    plain = sdk.chat.completions.create(**body)
    text = plain.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    for stop_form in (None, stop):
        if stop_form is not None:
            body["stop"] = stop_form
            plain = sdk.chat.completions.create(**body)
        chunks = list(
            sdk.chat.completions.create(stream=True, stream_options={"include_usage": True}, **body)
        )
        usage = chunks[-1].usage
        assert chunks[-1].choices == [] and usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (
            plain.usage.prompt_tokens,
            plain.usage.completion_tokens,
        )
        for index in (0, 1):
            deltas = [part for c in chunks[:-1] for part in c.choices if part.index == index]
            assert deltas[0].delta.role == "assistant"
            assert "".join(d.delta.content or "" for d in deltas) == plain.choices[index].message.content
            assert [d.finish_reason for d in deltas if d.finish_reason] == [
                plain.choices[index].finish_reason
            ]
            streamed = [e for d in deltas if d.logprobs for e in d.logprobs.content]
            expected = plain.choices[index].logprobs.content
            assert [(e.token, [t.token for t in e.top_logprobs]) for e in streamed] == [
                (e.token, [t.token for t in e.top_logprobs]) for e in expected
            ]
            values = [[e.logprob, *(t.logprob for t in e.top_logprobs)] for e in streamed]
            want = [[e.logprob, *(t.logprob for t in e.top_logprobs)] for e in expected]
            assert values == [pytest.approx(v, abs=1e-4) for v in want]  # cached KV: float rounding


def test_completion_stream_of_several_prompts(sdk: openai.OpenAI) -> None:
    for prompts, echo in ((["The river", "A city"], True), ([[17, 42, 99], [5, 6, 7, 8]], False)):
        body = {"model": SERVED, "prompt": prompts, "max_tokens": 6, "temperature": 0, "echo": echo}
        extra = {"extra_body": {"return_token_ids": True}}
        plain = sdk.completions.create(**body, **extra)
        chunks = list(sdk.completions.create(stream=True, **body, **extra))
        for choice in plain.choices:
            parts = [part for c in chunks for part in c.choices if part.index == choice.index]
            assert "".join(p.text for p in parts) == choice.text
            assert parts[-1].finish_reason == choice.finish_reason
            assert parts[0].model_extra["prompt_token_ids"] == choice.model_extra["prompt_token_ids"]
            streamed = [t for p in parts for t in p.model_extra.get("token_ids") or []]
            assert streamed == choice.model_extra["token_ids"]


def test_prompt_logprobs_on_chat_score_the_prompt(sdk: openai.OpenAI, oracle: PeftOracle) -> None:
    import torch

    messages = [{"role": "user", "content": "What is the value of the number?"}]
    response = sdk.chat.completions.create(
        model=SERVED,
        messages=messages,
        max_tokens=1,
        extra_body={"prompt_logprobs": 2, "return_token_ids": True},
    )
    prompt = response.model_extra["prompt_token_ids"]
    scored = response.model_extra["prompt_logprobs"]
    assert scored[0] is None and len(scored) == len(prompt)
    with torch.inference_mode():
        logits = oracle.model(None)(input_ids=torch.tensor([prompt])).logits[0].float()
    reference = torch.log_softmax(logits, -1)
    for q in range(1, len(prompt)):
        entry = scored[q][str(prompt[q])]
        assert entry["logprob"] == pytest.approx(float(reference[q - 1, prompt[q]]), abs=1e-4)


def test_request_id_user_cache_salt_tools_null_and_unknown_fields_are_accepted(sdk: openai.OpenAI) -> None:
    response = sdk.chat.completions.create(
        model=SERVED,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        user="someone",
        tools=openai.NOT_GIVEN,
        extra_body={
            "request_id": "abc123",
            "cache_salt": "s3cret-salt",
            "tools": None,
            "tool_choice": "none",
            "some_future_field": {"x": 1},
        },
    )
    assert response.id == "chatcmpl-abc123"
    models = {m.id: m for m in sdk.models.list().data}
    assert set(models) == {
        SERVED,
        ALIAS,
        "uncertainty",
        "answerability",
        "query_rewrite",
        "certainty",
        "rewrite",
    }
    assert (
        models["certainty"].model_extra["parent"] == SERVED and models[SERVED].model_extra["parent"] is None
    )
    assert sdk.models.retrieve("rewrite").id == "rewrite"
