"""Engine results -> the non-streamed response bodies (the streamed ones: stream.py).

results[p][c]  the GenerationResult of prompt p's choice c   (chat: one prompt)
choice index   p * n + c
usage          each prompt's tokens once, every choice's completion tokens, cached per prompt
"""

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from alora_core import GenerationResult
from alora_core.sampling import TokenLogprobs
from service.openai.logprobs import (
    TokenStrings,
    chat_logprobs,
    completion_logprobs,
    prompt_logprobs,
    token_strings,
)
from service.openai.protocol import ChatCompletionRequest, CompletionRequest
from service.openai.responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    PromptTokensDetails,
    UsageInfo,
)

Results = list[list[GenerationResult]]
EchoParts = tuple[str, list[int], list[str], list[TokenLogprobs | None]]


@dataclass(frozen=True)
class Meta:
    """What every body of one request shares."""

    id: str
    created: int
    model: str
    strings: TokenStrings
    ending_ids: tuple[int, ...]  # tokens that end a choice (shown as themselves in logprobs)


def usage_of(prompts: list[list[int]], results: Results, echo_only: bool = False) -> UsageInfo:
    prompt_tokens = sum(len(p) for p in prompts)
    completion = 0 if echo_only else sum(len(r.token_ids) for choices in results for r in choices)
    cached = sum(choices[0].usage.cached_tokens for choices in results)
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def trim(entry: TokenLogprobs, k: int | None) -> TokenLogprobs:
    """The entry with at most k top logprobs (the engine computed the most any field asked)."""
    return entry if k is None else TokenLogprobs(entry.logprob, entry.rank, entry.top[:k])


def chat_body(
    body: ChatCompletionRequest, meta: Meta, prompt: list[int], results: Results
) -> ChatCompletionResponse:
    choices = []
    for index, result in enumerate(results[0]):
        logprobs = None
        if body.logprobs:
            texts = token_strings(meta.strings.stepper(meta.ending_ids), result.token_ids)
            logprobs = chat_logprobs(meta.strings, texts, result.logprobs or [])
        choices.append(
            ChatChoice(
                index=index,
                message=AssistantMessage(content=result.text),
                logprobs=logprobs,
                finish_reason=result.finish_reason,
                stop_reason=result.stop_reason,
                token_ids=result.token_ids if body.return_token_ids else None,
            )
        )
    scored = results[0][0].prompt_logprobs or []
    return ChatCompletionResponse(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        choices=choices,
        usage=usage_of([prompt], results),
        prompt_token_ids=prompt if body.return_token_ids else None,
        prompt_logprobs=None
        if body.prompt_logprobs is None
        else prompt_logprobs(meta.strings, prompt, scored),
    )


class Prompts:
    """A completion request's prompts: token ids and, for a string prompt, its text (filled as each
    is tokenized on its worker thread), and what `echo` prepends."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, count: int) -> None:
        self.tokenizer = tokenizer
        self.ids: list[list[int]] = [[] for _ in range(count)]
        self.texts: list[str | None] = [None] * count

    def echo_text(self, index: int) -> str:
        text = self.texts[index]
        return (
            text
            if text is not None
            else str(self.tokenizer.decode(self.ids[index], skip_special_tokens=False))
        )

    def echo(
        self, index: int, strings: TokenStrings, k: int | None, result: GenerationResult | None
    ) -> EchoParts:
        """(text, ids, token strings, logprob entries) of prompt `index` as echo prepends them; no
        logprobs without k or without the result holding the prompt's."""
        ids = self.ids[index]
        if k is None or result is None:
            return self.echo_text(index), ids, [], []
        texts = token_strings(strings.stepper((), skip_special_tokens=False), ids)
        entries = [None, *(trim(e, k) for e in result.prompt_logprobs or [])]
        return self.echo_text(index), ids, texts, entries


def completion_body(
    body: CompletionRequest, meta: Meta, prompts: Prompts, results: Results
) -> CompletionResponse:
    echo_only = body.max_tokens == 0
    choices = []
    for p, choice_results in enumerate(results):
        for c, result in enumerate(choice_results):
            choices.append(completion_choice(body, meta, prompts, p, p * body.n + c, result, echo_only))
    return CompletionResponse(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        choices=choices,
        usage=usage_of(prompts.ids, results, echo_only),
    )


def completion_choice(
    body: CompletionRequest,
    meta: Meta,
    prompts: Prompts,
    prompt: int,
    index: int,
    result: GenerationResult,
    echo_only: bool,
) -> CompletionChoice:
    tokens = [] if echo_only else result.token_ids
    text = "" if echo_only else result.text
    texts: list[str] = []
    entries: list[Any] = []
    if body.echo:
        echo_text, _, texts, entries = prompts.echo(prompt, meta.strings, body.logprobs, result)
        text = echo_text + text
    logprobs = None
    if body.logprobs is not None:
        own = token_strings(meta.strings.stepper(meta.ending_ids), tokens)
        logprobs = completion_logprobs(
            meta.strings, texts + own, entries + ([] if echo_only else list(result.logprobs or []))
        )
    ids = prompts.ids[prompt]
    scored = [trim(e, body.prompt_logprobs) for e in result.prompt_logprobs or []]
    return CompletionChoice(
        index=index,
        text=text,
        logprobs=logprobs,
        finish_reason="length" if echo_only else result.finish_reason,  # echo only: max_tokens 0 reached
        stop_reason=None if echo_only else result.stop_reason,
        prompt_logprobs=None if body.prompt_logprobs is None else prompt_logprobs(meta.strings, ids, scored),
        prompt_token_ids=ids if body.return_token_ids else None,
        token_ids=tokens if body.return_token_ids else None,
    )
