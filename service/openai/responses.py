"""Response bodies of the OpenAI-compatible routes (OpenAI's shapes plus vLLM's extension fields).
Streaming chunks are built as plain dicts in `service.openai.stream`, with the same field names."""

from typing import Literal

from pydantic import BaseModel, Field, JsonValue

FinishReason = Literal["stop", "length", "error"]  # error: the output constraint allowed no next token


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "alora-serve"
    root: str | None = Field(None, description="The base model's or the adapter's directory.")
    parent: str | None = Field(None, description="For an adapter: the base model's served name.")
    max_model_len: int | None = None
    kind: Literal["base", "lora", "alora"] = Field(description="alora-serve's: what this model is.")
    alias_of: str | None = Field(None, description="alora-serve's: this name is another adapter's alias.")
    io: dict[str, JsonValue] | None = Field(
        None, description="alora-serve's: the adapter's io.yaml summary (output schema, result rules)."
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VersionInfo(BaseModel):
    version: str = Field(description="The alora-serve package version.")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens whose KV was reused from the cache.")


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


STOP_REASON = (
    "vLLM's: the stop token id or stop string that ended the choice (finish_reason stop); null for "
    "the end-of-text token and every other finish."
)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason
    stop_reason: int | str | None = Field(None, description=STOP_REASON)
    token_ids: list[int] | None = Field(None, description="vLLM's, with return_token_ids.")


class PromptLogprob(BaseModel):
    logprob: float
    rank: int
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    prompt_token_ids: list[int] | None = Field(None, description="vLLM's, with return_token_ids.")
    prompt_logprobs: PromptLogprobs | None = Field(None, description="vLLM's, with prompt_logprobs.")


class CompletionLogprobs(BaseModel):
    """The legacy shape: per token its text, its logprob, and {text: logprob} of the top ones and
    the token itself (so up to logprobs + 1 entries)."""

    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason
    stop_reason: int | str | None = Field(None, description=STOP_REASON)
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail
