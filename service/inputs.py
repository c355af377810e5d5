"""Request input -> token ids. Runs on the worker thread with the engine call (tokenizing a long
history is real CPU work, kept off the event loop).

    messages   -> chat template (generation prompt for /generate, none for intrinsics) -> ids
    prompt     -> tokenizer.encode(prompt)   (the tokenizer's defaults, e.g. a BOS token)
    input_ids  -> as given
"""

from collections.abc import Iterator
from contextlib import contextmanager

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from alora_core.errors import AloraError, InvalidRequestError
from service.schemas import InputFields


def encode_input(
    tokenizer: PreTrainedTokenizerBase, body: InputFields, generation_prompt: bool
) -> list[int] | None:
    """Token ids of the body's input form, None when it has none."""
    if body.messages is not None:
        messages = [m.model_dump() for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        except (TemplateError, ValueError) as exc:  # no template, or the template rejects the messages
            raise InvalidRequestError(f"cannot apply the model's chat template: {exc}") from exc
        assert isinstance(text, str)
        return list(tokenizer.encode(text, add_special_tokens=False))
    if body.prompt is not None:
        return list(tokenizer.encode(body.prompt))
    if body.input_ids is not None:
        return list(body.input_ids)
    return None


def with_invocation(input_ids: list[int], invocation: tuple[int, ...] | None) -> list[int]:
    """Append an aLoRA's invocation unless the input already contains it (anywhere: the adapter
    activates at its last occurrence). Plain LoRA adapters have none."""
    if not invocation or _contains(input_ids, invocation):
        return input_ids
    return input_ids + list(invocation)


def _contains(tokens: list[int], pattern: tuple[int, ...]) -> bool:
    m = len(pattern)
    first = pattern[0]
    return any(tokens[i] == first and tuple(tokens[i : i + m]) == pattern for i in range(len(tokens) - m + 1))


@contextmanager
def public_ids(engine_key: str | None, conversation_id: str | None) -> Iterator[None]:
    """Engine errors name the tenant-namespaced key; clients must only ever see their own id."""
    try:
        yield
    except AloraError as exc:
        if engine_key is None or conversation_id is None or engine_key not in exc.message:
            raise
        raise type(exc)(exc.message.replace(engine_key, conversation_id)) from None
