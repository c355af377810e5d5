"""Server-sent events of `stream: true` on the OpenAI routes, in OpenAI's chunk shapes:

    data: {"object": "chat.completion.chunk", "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}}]}
    data: {... "choices": [{"index": i, "delta": {"content": "<text delta>"}, "logprobs": ..., "token_ids": ...}]}
    data: {... "choices": [{"index": i, "delta": {}, "finish_reason": "stop"}]}              (per choice)
    data: {... "choices": [], "usage": {...}}                         (with stream_options.include_usage)
    data: [DONE]

(`text_completion` chunks carry `text` instead of `delta`.) Text deltas hold back what may still
change (an incomplete character, the start of a stop string): they add up to the non-streamed text.
An error after the first chunk is sent as `data: {"error": {...}}`, then `data: [DONE]`.
"""

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from alora_core import GenerationResult
from alora_core.errors import AloraError
from alora_core.sampling import TokenLogprobs
from service.errors import error_body
from service.openai.logprobs import TokenStepper, TokenStrings, chat_entries, completion_logprobs
from service.runner import Finished, Sampled, TokenStream
from service.streaming import DONE, IncrementalText, sse

log = logging.getLogger(__name__)


@dataclass
class ChoiceState:
    text: IncrementalText  # content deltas (stop strings applied)
    strings: TokenStepper | None  # logprob token strings (None: no logprobs asked)
    offset: int = 0  # completions: text offset of the next token (legacy logprobs)
    started: bool = False


@dataclass
class Chunks:
    """Builds one request's chunks: the fixed fields once, each chunk's choices per call."""

    id: str
    object: str
    created: int
    model: str
    extra: dict[str, Any] = field(default_factory=dict)  # fields of the first chunk only

    def chunk(self, choices: list[dict[str, Any]], **more: Any) -> str:
        body = {"id": self.id, "object": self.object, "created": self.created, "model": self.model}
        body.update(self.extra)
        self.extra = {}
        return sse({**body, "choices": choices, **more})


Usage = Callable[[list[list[GenerationResult]]], dict[str, Any] | None]  # None: no usage chunk


async def chat_events(
    stream: TokenStream,
    chunks: Chunks,
    n: int,
    make_text: Callable[[], IncrementalText],
    strings: TokenStrings | None,
    make_stepper: Callable[[], TokenStepper] | None,
    return_token_ids: bool,
    usage: Usage,
) -> AsyncIterator[str]:
    states = [ChoiceState(make_text(), make_stepper() if make_stepper else None) for _ in range(n)]

    def delta(index: int, tokens: list[int], entries: list[TokenLogprobs | None]) -> dict[str, Any]:
        state = states[index]
        choice: dict[str, Any] = {"index": index, "delta": {"content": state.text.add(tokens)}}
        if state.strings is not None and strings is not None:
            texts = [state.strings.next(t) for t in tokens]
            content = chat_entries(strings, texts, [e for e in entries if e is not None])
            choice["logprobs"] = {"content": [e.model_dump() for e in content]}
        if return_token_ids:
            choice["token_ids"] = tokens
        choice["finish_reason"] = None
        return choice

    def finish(index: int, result: GenerationResult) -> dict[str, Any]:
        state = states[index]
        rest = result.text[len(state.text.released) :] if result.text.startswith(state.text.released) else ""
        return {
            "index": index,
            "delta": {"content": rest} if rest else {},
            "finish_reason": result.finish_reason,
            "stop_reason": result.stop_reason,
        }

    yield chunks.chunk(
        [
            {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for i in range(n)
        ]
    )
    async for event in _events(stream, delta, finish, usage, chunks):
        yield event


async def completion_events(
    stream: TokenStream,
    chunks: Chunks,
    n: int,
    make_text: Callable[[], IncrementalText],
    strings: TokenStrings | None,
    make_stepper: Callable[[], TokenStepper] | None,
    return_token_ids: bool,
    usage: Usage,
    prompt: Callable[[int], tuple[str, list[int]]],
    echo: bool,
    drop_output: bool,
) -> AsyncIterator[str]:
    """`prompt(choice)` -> (its prompt's text, ids): the text is sent before the choice's first token
    with echo, the ids with return_token_ids; drop_output: echo with max_tokens 0 (the sampled token
    is dropped). Echo with logprobs is not streamed (refused by the route)."""
    states = [ChoiceState(make_text(), make_stepper() if make_stepper else None) for _ in range(n)]

    def echoed(index: int) -> dict[str, Any] | None:
        state = states[index]
        if state.started or not (echo or return_token_ids):
            return None
        state.started = True
        text, ids = prompt(index)
        text = text if echo else ""
        state.offset = len(text)
        choice: dict[str, Any] = {"index": index, "text": text, "logprobs": None, "finish_reason": None}
        if return_token_ids:
            choice["prompt_token_ids"] = ids
        return choice

    def delta(index: int, tokens: list[int], entries: list[TokenLogprobs | None]) -> list[dict[str, Any]]:
        state = states[index]
        out = [c for c in [echoed(index)] if c is not None]
        if drop_output:
            return out
        choice: dict[str, Any] = {"index": index, "text": state.text.add(tokens), "logprobs": None}
        if state.strings is not None and strings is not None:
            texts = [state.strings.next(t) for t in tokens]
            logprobs = completion_logprobs(strings, texts, list(entries), state.offset)
            state.offset += sum(len(t) for t in texts)
            choice["logprobs"] = logprobs.model_dump()
        if return_token_ids:
            choice["token_ids"] = tokens
        choice["finish_reason"] = None
        return [*out, choice]

    def finish(index: int, result: GenerationResult) -> list[dict[str, Any]]:
        state = states[index]
        out = [c for c in [echoed(index)] if c is not None]
        released = state.text.released
        rest = result.text[len(released) :] if result.text.startswith(released) and not drop_output else ""
        reason = "length" if drop_output else result.finish_reason  # echo only: max_tokens 0 reached
        stop = None if drop_output else result.stop_reason
        return [
            *out,
            {"index": index, "text": rest, "logprobs": None, "finish_reason": reason, "stop_reason": stop},
        ]

    async for event in _events(stream, delta, finish, usage, chunks):
        yield event


async def _events(
    stream: TokenStream,
    delta: Callable[[int, list[int], list[TokenLogprobs | None]], Any],
    finish: Callable[[int, GenerationResult], Any],
    usage: Usage,
    chunks: Chunks,
) -> AsyncIterator[str]:
    """The choices' chunks as samples arrive (grouped per choice, in arrival order), then usage."""
    failed = False  # a choice ended with an error: stop here, the results below raise it
    try:
        async for batch in stream.items():
            pending: dict[int, tuple[list[int], list[TokenLogprobs | None]]] = {}
            ended: list[Finished] = []
            for item in batch:
                if isinstance(item, Sampled):
                    tokens, entries = pending.setdefault(item.choice, ([], []))
                    tokens.append(item.token)
                    entries.append(item.logprobs)
                else:
                    ended.append(item)
            choices: list[dict[str, Any]] = []
            for index, (tokens, entries) in pending.items():
                made = delta(index, tokens, entries)
                choices += made if isinstance(made, list) else [made]
            for end in ended:
                try:
                    result = end.handle.result()
                except AloraError:
                    failed = True
                    continue
                made = finish(end.choice, result)
                choices += made if isinstance(made, list) else [made]
            if choices:
                yield chunks.chunk(choices)
            if failed:
                break
    finally:  # also when the client goes away mid-stream (the generator is closed): stop the engine
        if not failed and not stream.done():
            stream.cancel()
    try:
        results = await stream.results()
    except AloraError as exc:
        log.info("stream %s failed after its first chunk: %s", chunks.id, exc.message)
        yield sse(error_body(exc.status_code, exc.code, exc.message, openai=True))
        yield DONE
        return
    totals = usage(results)
    if totals is not None:
        yield chunks.chunk([], usage=totals)
    yield DONE
