"""Logprobs in OpenAI's and vLLM's shapes, from the engine's raw logprobs (alora_core TokenLogprobs).

Token strings: a generated token's string is the text it adds (decoded incrementally, so the strings
of a choice concatenate to its text; a token that completes nothing, such as part of a multi-byte
character, is ""), except the token that ended the choice (EOS or a stop id), shown as itself
(`<|end_of_text|>`), as vLLM does. Alternatives in `top_logprobs` are each decoded alone. Values
are clamped at -9999.0 (JSON has no -inf), as vLLM does.
"""

from collections.abc import Iterable

from transformers import PreTrainedTokenizerBase

from alora_core.sampling import TokenLogprobs
from service.openai.responses import (
    ChatLogprobs,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    TokenLogprob,
    TopLogprob,
)
from service.streaming import IncrementalText

MIN_LOGPROB = -9999.0


def clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


class TokenStrings:
    """Decodes token ids for logprobs (single tokens cached: top alternatives repeat a lot)."""

    MAX_CACHED = 1 << 17

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._alone: dict[int, str] = {}

    def alone(self, token: int) -> str:
        text = self._alone.get(token)
        if text is None:
            text = str(self.tokenizer.decode([token], skip_special_tokens=False))
            if len(self._alone) < self.MAX_CACHED:
                self._alone[token] = text
        return text

    def stepper(self, ending_ids: Iterable[int], skip_special_tokens: bool = True) -> "TokenStepper":
        return TokenStepper(self, frozenset(ending_ids), skip_special_tokens)


class TokenStepper:
    """Strings of one choice's tokens, one call per token as they come (streaming or not)."""

    def __init__(self, strings: TokenStrings, ending_ids: frozenset[int], skip_special_tokens: bool) -> None:
        self._strings = strings
        self._ending_ids = ending_ids  # tokens that end a choice: shown as themselves
        self._text = IncrementalText(strings.tokenizer, [], skip_special_tokens)

    def next(self, token: int) -> str:
        if token in self._ending_ids:
            return self._strings.alone(token)
        return self._text.add([token])

    def flush(self) -> str:
        """What an unfinished character at the end still holds (added to the last token's string)."""
        return self._text.flush()


def token_strings(stepper: TokenStepper, tokens: list[int]) -> list[str]:
    strings = [stepper.next(t) for t in tokens]
    rest = stepper.flush()
    if rest and strings:
        strings[-1] += rest
    return strings


def chat_entries(
    strings: TokenStrings, texts: list[str], entries: Iterable[TokenLogprobs]
) -> list[TokenLogprob]:
    """`logprobs.content` entries: one per token (its string from `texts`), top ones most likely first."""
    out = []
    for text, entry in zip(texts, entries, strict=True):
        top = [
            TopLogprob(token=(s := strings.alone(t)), logprob=clamp(v), bytes=list(s.encode()))
            for t, v in entry.top
        ]
        out.append(
            TokenLogprob(
                token=text, logprob=clamp(entry.logprob), bytes=list(text.encode()), top_logprobs=top
            )
        )
    return out


def chat_logprobs(strings: TokenStrings, texts: list[str], entries: list[TokenLogprobs]) -> ChatLogprobs:
    return ChatLogprobs(content=chat_entries(strings, texts, entries))


def completion_logprobs(
    strings: TokenStrings,
    texts: list[str],
    entries: list[TokenLogprobs | None],
    offset: int = 0,
) -> CompletionLogprobs:
    """The legacy shape. `entries[i]` None: no logprob (the first prompt token of an echo)."""
    offsets, logprobs, tops = [], [], []
    for text, entry in zip(texts, entries, strict=True):
        offsets.append(offset)
        offset += len(text)
        if entry is None:
            logprobs.append(None)
            tops.append(None)
            continue
        logprobs.append(clamp(entry.logprob))
        top = {text: clamp(entry.logprob)}  # the token itself, then its alternatives (vLLM's order)
        for token, value in entry.top:
            top.setdefault(strings.alone(token), clamp(value))
        tops.append(top)
    return CompletionLogprobs(
        text_offset=offsets, token_logprobs=logprobs, tokens=list(texts), top_logprobs=tops
    )


def prompt_logprobs(strings: TokenStrings, prompt: list[int], entries: list[TokenLogprobs]) -> PromptLogprobs:
    """vLLM's `prompt_logprobs`: None for the first token, then {token id: {logprob, rank,
    decoded_token}} holding the prompt's token and the top ones."""
    out: PromptLogprobs = [None]
    for token, entry in zip(prompt[1:], entries, strict=True):
        position = {
            str(token): PromptLogprob(
                logprob=clamp(entry.logprob), rank=entry.rank, decoded_token=strings.alone(token)
            )
        }
        for rank, (top, value) in enumerate(entry.top, start=1):
            position.setdefault(
                str(top), PromptLogprob(logprob=clamp(value), rank=rank, decoded_token=strings.alone(top))
            )
        out.append(position)
    return out
