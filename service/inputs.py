"""Request input -> token ids. Runs on the worker thread with the engine call (tokenizing a long
history is real CPU work, kept off the event loop).

    messages   -> chat template (generation prompt for /generate, none for intrinsics) -> ids
    prompt     -> tokenizer.encode(prompt)   (the tokenizer's defaults, e.g. a BOS token)
    input_ids  -> as given

`render_chat` / `encode_chat` are the one place a chat template is applied (the OpenAI routes too).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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
        return encode_chat(tokenizer, messages, add_generation_prompt=generation_prompt)
    if body.prompt is not None:
        return list(tokenizer.encode(body.prompt))
    if body.input_ids is not None:
        return list(body.input_ids)
    return None


# apply_chat_template's own parameters: not template variables a request may set
_RESERVED_KWARGS = frozenset(
    {"conversation", "tools", "documents", "chat_template", "add_generation_prompt", "continue_final_message",
     "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
     "return_assistant_tokens_mask", "tokenizer_kwargs"}
)  # fmt: skip


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool = False,
    documents: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The model's chat template applied to messages (400 when the template rejects them)."""
    reserved = sorted(_RESERVED_KWARGS & set(template_kwargs or {}))
    if reserved:
        raise InvalidRequestError(f"chat template variable(s) {reserved} cannot be set this way")
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            documents=documents,
            **(template_kwargs or {}),
        )
    except (TemplateError, ValueError, TypeError) as exc:  # no template, or it rejects the messages
        raise InvalidRequestError(f"cannot apply the model's chat template: {exc}") from exc
    assert isinstance(text, str)
    return text


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    *,
    add_special_tokens: bool = False,
    **render: Any,
) -> list[int]:
    """render_chat, then tokens (no special tokens added: the template writes its own)."""
    text = render_chat(tokenizer, messages, **render)
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def contains(tokens: list[int], pattern: tuple[int, ...]) -> bool:
    m = len(pattern)
    first = pattern[0]
    return any(tokens[i] == first and tuple(tokens[i : i + m]) == pattern for i in range(len(tokens) - m + 1))


def with_invocation(input_ids: list[int], invocation: tuple[int, ...] | None) -> list[int]:
    """Append an aLoRA's invocation unless the input already contains it (anywhere: the adapter
    activates at its last occurrence). Plain LoRA adapters have none."""
    if not invocation or contains(input_ids, invocation):
        return input_ids
    return input_ids + list(invocation)


@contextmanager
def public_ids(engine_key: str | None, conversation_id: str | None) -> Iterator[None]:
    """Engine errors name the tenant-namespaced key; clients must only ever see their own id."""
    try:
        yield
    except AloraError as exc:
        if engine_key is None or conversation_id is None or engine_key not in exc.message:
            raise
        raise type(exc)(exc.message.replace(engine_key, conversation_id)) from None
