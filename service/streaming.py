"""Server-sent events for `stream: true`:

    data: {"type": "token", "conversation_id": ..., "token_ids": [..], "text": "<delta>"}   (per chunk)
    ...
    data: {"type": "final", ...the non-streaming response body...}
    data: [DONE]

An error after the first token (the HTTP status is already 200) is sent as
`data: {"type": "error", "error": {...}}` followed by `data: [DONE]`.

Text deltas are decoded incrementally (a window of recent tokens, not the whole output each time)
and hold back what may still change: an incomplete UTF-8 character, and the tail that could be the
start of a stop string. The deltas concatenate to the final `text`.
"""

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from transformers import PreTrainedTokenizerBase

from alora_core import GenerationResult
from alora_core.errors import AloraError
from service.errors import error_body
from service.runner import TokenStream
from service.schemas import StreamFinal, StreamToken

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class IncrementalText:
    """Detokenizes a growing token list into text deltas (the prefix/read-offset window method)."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, stop: list[str], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._tokens: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._pending = ""  # decoded text not released yet (might be the start of a stop string)
        self._stop = stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self._stopped = False  # a stop string was seen: the text ends before it
        self.released = ""

    def add(self, tokens: list[int]) -> str:
        self._tokens.extend(tokens)
        prefix = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        full = self._decode(self._tokens[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._pending += full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._tokens)
        if self._stopped:
            return ""
        cut = len(self._pending) - self._holdback
        stop_at = self._stop_position()
        if stop_at is not None:
            self._stopped = True
            cut = stop_at - len(self.released)
        if cut <= 0:
            return ""
        delta, self._pending = self._pending[:cut], self._pending[cut:]
        self.released += delta
        return delta

    def _decode(self, tokens: list[int]) -> str:
        return str(self._tokenizer.decode(tokens, skip_special_tokens=self._skip_special_tokens))

    def flush(self) -> str:
        """The rest once no token follows: text held back (an incomplete character at the end, or
        the tail that could have started a stop string), up to a stop string seen."""
        if self._stopped:
            return ""
        full = self._decode(self._tokens[self._prefix_offset :])
        prefix = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        rest = self._pending + full[len(prefix) :] if full.startswith(prefix) else self._pending
        self._pending = ""
        self.released += rest
        return rest

    def _stop_position(self) -> int | None:
        """Where the first stop string starts in the text so far (the engine's rule), if anywhere."""
        text = self.released + self._pending
        start = max(0, len(self.released) - self._holdback)
        hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else None


async def generate_events(
    stream: TokenStream,
    conversation_id: str,
    tokenizer: PreTrainedTokenizerBase,
    stop: list[str],
    finalize: Callable[[GenerationResult], StreamFinal],
) -> AsyncIterator[str]:
    text = IncrementalText(tokenizer, stop)
    try:
        async for chunk in stream.chunks():
            delta = text.add(chunk)
            yield sse(StreamToken(conversation_id=conversation_id, token_ids=chunk, text=delta).model_dump())
    finally:  # also when the client goes away mid-stream (the generator is closed): stop the engine
        if not stream.done():
            stream.cancel()
    try:
        result = await stream.result()
    except AloraError as exc:
        log.info("stream of %s failed after its first token: %s", conversation_id, exc.message)
        yield sse({"type": "error", **error_body(exc.status_code, exc.code, exc.message)})
        yield DONE
        return
    final = finalize(result)
    if final.text.startswith(text.released) and len(final.text) > len(text.released):
        rest = final.text[len(text.released) :]
        yield sse(StreamToken(conversation_id=conversation_id, token_ids=[], text=rest).model_dump())
    yield sse(final.model_dump())
    yield DONE
