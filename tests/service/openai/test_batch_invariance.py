"""Batch invariance through the async openai SDK: 16 concurrent mixed requests (chat and completions;
base, aLoRA and LoRA; n=2; streaming; two cancelled mid-stream) give the same tokens and logprobs
as the same requests run one at a time."""

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import openai

from tests.alora_core.conftest import random_ids
from tests.service.conftest import KEY_A, ServerProcess
from tests.service.openai.conftest import SERVED, invocation

Outcome = list[tuple[list[int], list[float] | None]]  # per choice: token ids, logprobs
Call = Callable[[openai.AsyncOpenAI], Coroutine[Any, Any, Outcome]]


def chat(model: str, content: str, **fields: Any) -> Call:
    async def call(client: openai.AsyncOpenAI) -> Outcome:
        response = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": content}],
            extra_body={"return_token_ids": True, "ignore_eos": True},
            **{"temperature": 0, **fields},
        )
        return [
            (c.model_extra["token_ids"], [e.logprob for e in c.logprobs.content] if c.logprobs else None)
            for c in response.choices
        ]

    return call


def completion(model: str, prompt: list[int], **fields: Any) -> Call:
    async def call(client: openai.AsyncOpenAI) -> Outcome:
        response = await client.completions.create(
            model=model,
            prompt=prompt,
            extra_body={"return_token_ids": True, "ignore_eos": True},
            **{"temperature": 0, **fields},
        )
        return [
            (c.model_extra["token_ids"], c.logprobs.token_logprobs if c.logprobs else None)
            for c in response.choices
        ]

    return call


def streamed_chat(model: str, content: str, **fields: Any) -> Call:
    async def call(client: openai.AsyncOpenAI) -> Outcome:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": content}],
            temperature=0,
            stream=True,
            extra_body={"return_token_ids": True, "ignore_eos": True},
            **fields,
        )
        tokens: dict[int, list[int]] = {}
        async for chunk in stream:
            for choice in chunk.choices:
                tokens.setdefault(choice.index, []).extend(choice.model_extra.get("token_ids") or [])
        return [(tokens[i], None) for i in sorted(tokens)]

    return call


def cancelled(model: str, content: str) -> Call:
    """A long stream the client drops after its first chunk."""

    async def call(client: openai.AsyncOpenAI) -> Outcome:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": content}],
            max_tokens=200,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        async for _ in stream:
            break
        await stream.close()
        return []

    return call


def test_sixteen_concurrent_mixed_requests_equal_their_solo_runs(openai_server: ServerProcess) -> None:
    certainty = invocation(openai_server, "certainty")
    calls: list[Call] = [
        chat(SERVED, "Tell me about the weather in the city.", max_tokens=9, logprobs=True, top_logprobs=2),
        chat("certainty", "Is this answer certain?", max_tokens=5, logprobs=True),
        chat("answerability", "Can the document answer this?", max_tokens=6),
        chat("rewrite", "Rewrite the query about rivers.", max_tokens=8),
        chat(SERVED, "Explain the cache.", max_tokens=7, n=2),
        chat("certainty", "How sure is the model?", max_tokens=4, n=2, temperature=1.0, seed=7),
        completion(SERVED, random_ids(40, seed=1901), max_tokens=10, logprobs=3),
        completion("certainty", random_ids(25, seed=1902) + certainty, max_tokens=5, logprobs=1),
        completion("rewrite", random_ids(33, seed=1903), max_tokens=7),
        completion(SERVED, random_ids(70, seed=1904), max_tokens=6, n=2),
        completion("rewrite", random_ids(12, seed=1905), max_tokens=9, n=2, logprobs=0),
        streamed_chat(SERVED, "Stream a sentence about mountains.", max_tokens=8),
        streamed_chat("rewrite", "Stream a rewrite.", max_tokens=6, n=2),
        streamed_chat("certainty", "Stream the certainty.", max_tokens=5),
        cancelled(SERVED, "A long answer nobody reads."),
        cancelled("rewrite", "Another long answer nobody reads."),
    ]
    assert len(calls) == 16

    async def run(together: bool) -> list[Outcome]:
        async with openai.AsyncOpenAI(
            base_url=f"{openai_server.url}/v1", api_key=KEY_A, max_retries=0, timeout=300
        ) as client:
            if together:
                return list(await asyncio.gather(*(call(client) for call in calls)))
            return [await call(client) for call in calls]

    solo = asyncio.run(run(together=False))
    batched = asyncio.run(run(together=True))
    for i, (alone, mixed) in enumerate(zip(solo, batched, strict=True)):
        assert [tokens for tokens, _ in mixed] == [tokens for tokens, _ in alone], i
        for (_, a), (_, b) in zip(alone, mixed, strict=True):
            assert (a is None) == (b is None)
            if a is not None and b is not None:
                assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4, i
    assert all(outcome for outcome in solo[:14])  # every request but the cancelled ones answered
