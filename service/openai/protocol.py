"""Request bodies of the OpenAI-compatible routes, in OpenAI's and vLLM's shapes.

Unknown fields are ignored, as vLLM does (clients send provider-specific extras). A field OpenAI or
vLLM defines that this service does not implement is refused when given a value other than its
default: a 400 naming it, never a silent difference (`NOT_IMPLEMENTED` below; the checks across
fields are in convert.check_request, so each error names its field). Types are strict (`"3"` or
`true` is not an integer).
"""

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from alora_core.sampling import MAX_LOGPROBS, MAX_N, MAX_PENALTY
from service.schemas import Text

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
MAX_DOCUMENTS = 1024

# field -> the values that mean "not used" (anything else is refused with a 400 naming the field)
NOT_IMPLEMENTED: dict[str, tuple[Any, ...]] = {
    "structural_tag": (None,),  # structured outputs other than JSON / regex / choice / grammar
    # tool calling (parsing tool calls out of the output)
    "functions": (None, []),
    "function_call": (None, "none"),
    # other vLLM / OpenAI extensions
    "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True),
    "truncate_prompt_tokens": (None,),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "logprob_token_ids": (None,),
    "return_tokens_as_token_ids": (None, False),
    "return_prompt_text": (None, False),
    "prompt_embeds": (None,),
    "chat_template": (None,),
    "mm_processor_kwargs": (None, {}),
    "media_io_kwargs": (None, {}),
    "kv_transfer_params": (None,),
    "ec_transfer_params": (None,),
    "vllm_xargs": (None,),
    "priority": (None, 0),
    "thinking_token_budget": (None,),
    "repetition_detection": (None,),
    "watermarking": (None, False),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
}

StopString = Annotated[Text, Field(min_length=1, max_length=256)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class OpenAIModel(BaseModel):
    """Strict types; unknown fields are kept aside (`model_extra`) and ignored."""

    model_config = ConfigDict(extra="allow", strict=True)


class TextPart(OpenAIModel):
    type: str = Field(description='Only "text" parts are accepted.')
    text: Text | None = None


class ChatMessage(OpenAIModel):
    """One message. Other fields (assistant `tool_calls`, a tool message's `tool_call_id`, `name`,
    `reasoning`...) are passed to the chat template as given."""

    role: Annotated[
        Text, Field(min_length=1, max_length=64, description="system, user, assistant, tool, ...")
    ]
    content: Text | list[TextPart] | None = Field(
        None, description="The text, or text parts (joined with newlines, as vLLM does)."
    )


class StreamOptions(OpenAIModel):
    include_usage: bool = Field(False, description="Send a last chunk with the usage of the whole request.")
    continuous_usage_stats: bool = Field(False, description="Not implemented (must be false).")


class SamplingRequest(OpenAIModel):
    """Fields both endpoints share."""

    model: str | None = Field(
        None, description="The served base model name or an adapter name (default: the base model)."
    )
    max_tokens: int | None = Field(
        None, ge=0, description="Most tokens to generate per choice. Absent: up to the context limit."
    )
    temperature: float | None = Field(
        None, ge=0.0, le=100.0, allow_inf_nan=False, description="Default 1; 0 = greedy."
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1, description="Keep the k most likely tokens; 0 or -1 = off.")
    min_p: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX - MAX_N, description="Choice i uses seed + i.")
    stop: (
        Annotated[Text, Field(min_length=1, max_length=256)]
        | list[Annotated[Text, Field(min_length=1, max_length=256)]]
        | None
    ) = Field(None, description="Stop string(s): each choice's text ends before the first one.")
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=256)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, description="EOS and stop_token_ids are suppressed before this many.")
    n: int = Field(1, ge=1, le=MAX_N, description="Choices: they share the prompt's prefill and KV.")
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) -> bias added to its logit, clamped to [-100, 100]."
    )
    presence_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0, allow_inf_nan=False)
    prompt_logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="vLLM's: logprobs of each prompt token and this many top ones.",
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Accepted and ignored (OpenAI: abuse monitoring).")
    cache_salt: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description="Separates this request's prefix-cache entries from other requests'.",
    )
    return_token_ids: bool | None = Field(
        None, description="vLLM's: each choice carries its `token_ids`, the response its prompt's."
    )
    request_id: str | None = Field(None, min_length=1, max_length=128, description="Becomes the response id.")
    tools: list[dict[str, JsonValue]] | None = Field(
        None, description="Not implemented: only null (or absent) is accepted."
    )
    tool_choice: str | dict[str, JsonValue] | None = Field(
        None, description='Only "none" or null (no tools are implemented).'
    )
    # structured outputs (service/structured.py): at most one of response_format (other than
    # text), structured_outputs, guided_*
    response_format: dict[str, JsonValue] | None = Field(
        None,
        description='{"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema"}}.',
    )
    structured_outputs: dict[str, JsonValue] | None = Field(
        None, description="vLLM's: one of json, regex, choice, grammar (Lark), json_object."
    )
    guided_json: dict[str, JsonValue] | str | None = Field(None, description="vLLM < 0.12: a JSON schema.")
    guided_regex: str | None = Field(None, description="vLLM < 0.12: a regular expression.")
    guided_choice: list[str] | None = Field(None, description="vLLM < 0.12: one of these strings.")
    guided_grammar: str | None = Field(None, description="vLLM < 0.12: a Lark (or GBNF) grammar.")
    guided_whitespace_pattern: str | None = Field(None, description="With guided_json: whitespace regex.")
    guided_decoding_backend: str | None = Field(None, description="Accepted; llguidance is always used.")

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions. The adapter is `model` (an adapter name) or, with the base model's
    name, `chat_template_kwargs.adapter_name` (the Granite Switch convention)."""

    messages: list[ChatMessage] = Field(min_length=1, description="The whole conversation so far.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Wins over max_tokens.")
    logprobs: bool = Field(False, description="Return each generated token's logprob.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="With logprobs: top alternatives."
    )
    add_generation_prompt: bool | None = Field(
        None, description="Default true (false when continue_final_message is set)."
    )
    continue_final_message: bool = Field(False, description="Leave the last message open and continue it.")
    add_special_tokens: bool = Field(
        False, description="Add the tokenizer's special tokens to the rendered prompt."
    )
    documents: list[dict[str, JsonValue]] | None = Field(
        None, max_length=MAX_DOCUMENTS, description="Passed to the chat template (RAG)."
    )
    chat_template_kwargs: dict[str, JsonValue] | None = Field(
        None, description="Extra chat template variables; `adapter_name` selects an adapter instead."
    )
    reasoning_effort: str | None = Field(None, description="Passed to the chat template as is.")
    echo: bool = Field(False, description="Not implemented for chat (must be false).")


PromptForm = (
    Annotated[Text, Field(max_length=1 << 22)]
    | Annotated[list[Text], Field(min_length=1, max_length=64)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1, max_length=64)]
)


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: one result per prompt per `n` (choice index = prompt * n + choice)."""

    prompt: PromptForm = Field(description="A string, strings, token ids, or lists of token ids.")

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_form(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:  # the union's own message lists every branch: say what is accepted
            raise ValueError(
                "prompt must be a string, a list of strings, a list of token ids (integers "
                ">= 0), or a list of such lists (at most 64 prompts)"
            ) from None

    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Legacy logprobs: top alternatives."
    )
    echo: bool = Field(False, description="Prepend the prompt (and its logprobs) to each choice.")
    add_special_tokens: bool = Field(
        True, description="Add the tokenizer's special tokens to string prompts."
    )
    suffix: str | None = Field(None, description="Not implemented (must be null or empty).")
    best_of: int | None = Field(None, description="Not implemented (null or equal to n).")
