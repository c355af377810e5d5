"""Request and response bodies. Field docs here become the OpenAPI reference (served at /docs)."""

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, StrictInt, model_validator

from alora_core import SamplingParams
from alora_core.sampling import MAX_TOKENS_LIMIT
from service.outputs import OutputFormat
from service.structured import output_constraint

MAX_STOP_STRINGS = 16
MAX_SEED = (1 << 63) - 1
MAX_FAN_OUT = 16  # intrinsics in one POST /intrinsics
MAX_DOCUMENTS = 256  # documents of one intrinsic request


def _utf8(text: str) -> str:
    """Reject strings JSON can carry but UTF-8 cannot (lone surrogates such as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid unicode: {exc.reason} at index {exc.start}") from exc
    return text


Text = Annotated[str, AfterValidator(_utf8)]
ConversationId = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9._~-]{1,128}$",
        description="Conversation id chosen by the client (1-128 of A-Z a-z 0-9 . _ ~ -), or returned "
        "by a first /generate without one. Ids are private to the API key that uses them.",
        examples=["c0ffee"],
    ),
]
TokenId = Annotated[StrictInt, Field(ge=0)]
CacheSalt = Annotated[
    str,
    AfterValidator(_utf8),
    Field(
        min_length=1,
        max_length=256,
        description="Only requests with the same salt (and API key) share cached KV: e.g. one per "
        "end user, so no timing can tell whether another user sent the same prompt (vLLM's cache_salt).",
    ),
]
FinishReason = Literal["stop", "length", "error"]  # error: the output constraint allowed no next token


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Annotated[Text, Field(min_length=1, max_length=64, description="system, user, assistant, ...")]
    content: Annotated[Text, Field(description="The message text.")]


class Document(BaseModel):
    """A RAG document (vLLM's `documents` entry)."""

    model_config = ConfigDict(extra="forbid")
    text: Text
    title: Text | None = None
    doc_id: Annotated[str, Field(max_length=256)] | None = None


class InputFields(BaseModel):
    """One of three ways to give the input. The chat template is applied to `messages` with the
    generation prompt added; `prompt` is tokenized with the tokenizer's defaults."""

    messages: list[Message] | None = Field(
        None, min_length=1, description="Chat messages (the FULL history of the conversation)."
    )
    prompt: Text | None = Field(None, description="Raw text (the full history), tokenized as is.")
    input_ids: list[TokenId] | None = Field(None, min_length=1, description="Token ids (the full history).")

    def input_forms(self) -> list[str]:
        return [f for f in ("messages", "prompt", "input_ids") if getattr(self, f) is not None]


class SamplingFields(BaseModel):
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS_LIMIT, description="Most tokens to generate.")
    temperature: float = Field(
        0.0, ge=0.0, le=100.0, allow_inf_nan=False, description="0 = greedy; higher = more random."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="Nucleus mass kept; 1 = off.")
    top_k: int = Field(0, ge=0, le=1 << 31, description="Keep the k most likely tokens; 0 = off.")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Fixes sampled tokens when temperature > 0."
    )
    stop: list[Annotated[Text, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list,
        max_length=MAX_STOP_STRINGS,
        description="Stop strings: the text ends before the first one generated.",
    )
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-text token (benchmarks).")
    response_format: dict[str, JsonValue] | None = Field(
        None,
        description='The output must match: {"type": "json_schema", "json_schema": {"schema": ...}}, '
        '{"type": "json_object"}, {"type": "regex", "regex": ...}, {"type": "choice", "choice": [...]}, '
        '{"type": "grammar", "grammar": <Lark>} or {"type": "text"} (docs/structured-outputs.md).',
    )

    def sampling_params(self) -> SamplingParams:
        """400 naming response_format when it is malformed (the engine compiles it on submit)."""
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=tuple(self.stop),
            ignore_eos=self.ignore_eos,
            constraint=output_constraint({"response_format": self.response_format}, native=True),
        )


class GenerateRequest(InputFields, SamplingFields):
    """Base-model continuation. Exactly one input form, holding the conversation's full history:
    the longest prefix already cached for `conversation_id` is reused."""

    model_config = ConfigDict(extra="forbid")

    conversation_id: ConversationId | None = None
    cache_salt: CacheSalt | None = None
    stream: bool = Field(False, description="Send tokens as server-sent events, then `data: [DONE]`.")

    @model_validator(mode="after")
    def _one_input(self) -> "GenerateRequest":
        forms = self.input_forms()
        if len(forms) != 1:
            raise ValueError(f"give exactly one of messages, prompt, input_ids (got {forms or 'none'})")
        return self


class IntrinsicRequest(InputFields, SamplingFields):
    """Run an adapter. Context = the input if given, else the conversation's tokens; the adapter's
    invocation is appended unless the context already contains it. The conversation never changes."""

    model_config = ConfigDict(extra="forbid")

    conversation_id: ConversationId | None = Field(
        None, description="Conversation whose cached base KV an aLoRA reuses (and the default context)."
    )
    cache_salt: CacheSalt | None = None
    add_invocation: bool = Field(
        True,
        description="Append an aLoRA's invocation when the context lacks it. false: such a context is "
        "a 422 error instead (for clients that place the invocation themselves).",
    )
    documents: list[Document] | None = Field(
        None,
        max_length=MAX_DOCUMENTS,
        description="Documents for the chat template (RAG intrinsics such as answerability); with "
        "`messages`. An io.yaml's sentence boundaries mark them.",
    )
    instruction_args: dict[Annotated[str, Field(max_length=64)], Text] | None = Field(
        None,
        description="Values for the io.yaml instruction's {placeholders} (e.g. `requirement`).",
    )
    logprobs: bool = Field(
        False,
        description="Return the output tokens' logprobs in OpenAI's chat shape (`logprobs`): top 10 "
        "alternatives when the io.yaml's rules need them (likelihood), else none.",
    )
    return_prompt_token_ids: bool = Field(False, description="Return the prompt as the model saw it.")

    @model_validator(mode="after")
    def _context(self) -> "IntrinsicRequest":
        forms = self.input_forms()
        if len(forms) > 1:
            raise ValueError(f"give at most one of messages, prompt, input_ids (got {forms})")
        if not forms and self.conversation_id is None:
            raise ValueError("give a conversation_id, an input (messages, prompt or input_ids), or both")
        return self


class IntrinsicItem(SamplingFields):
    """One intrinsic of a fan-out; sampling fields set here override the request's for this one."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,128}$", description="A loaded adapter.")]


class FanOutRequest(IntrinsicRequest):
    """Several intrinsics on one context in one call: they run in the same engine steps and share the
    conversation's cached prefix (an aLoRA fork copies no prefix block). The sampling fields here
    are the defaults of every item."""

    intrinsics: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,128}$")] | IntrinsicItem] = Field(
        min_length=1,
        max_length=MAX_FAN_OUT,
        description="Adapter names, or {name, sampling overrides} items.",
    )

    def items(self) -> list[tuple[str, IntrinsicRequest]]:
        """(adapter name, the single-intrinsic request it amounts to), in order."""
        common = self.model_dump(exclude={"intrinsics"}, exclude_unset=True)
        out = []
        for item in self.intrinsics:
            if isinstance(item, str):
                out.append((item, IntrinsicRequest(**common)))
            else:
                overrides = item.model_dump(exclude={"name"}, exclude_unset=True)
                out.append((item.name, IntrinsicRequest(**{**common, **overrides})))
        return out


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens of the context (including an appended invocation).")
    completion_tokens: int = Field(description="Tokens generated.")
    cached_tokens: int = Field(
        description="Context tokens whose KV was reused from the cache (any tier), not computed."
    )


class GenerateResponse(BaseModel):
    conversation_id: str = Field(description="The conversation this turn was committed to.")
    text: str = Field(description="Generated text (without the end-of-text token or a stop string).")
    token_ids: list[int] = Field(
        description="Generated token ids (with the final end-of-text token, if any)."
    )
    finish_reason: FinishReason = Field(
        description="stop: end of text or stop string; length: max_tokens; error: see `error`."
    )
    usage: Usage
    ttft_s: float = Field(description="Seconds from the engine starting the request to its first token.")
    total_s: float = Field(description="Seconds from the engine receiving the request to its end.")
    error: str | None = Field(
        None,
        description='finish_reason "error" only: why the output constraint allowed no next token.',
        exclude_if=lambda v: v is None,  # absent otherwise: the documented bodies stay as they were
    )
    stop_reason: int | str | None = Field(
        None,
        description='finish_reason "stop" by a stop token id or stop string: which one (as vLLM\'s '
        "stop_reason); absent for end of text and every other finish.",
        exclude_if=lambda v: v is None,  # absent otherwise: the documented bodies stay as they were
    )


class StreamToken(BaseModel):
    """One SSE event per chunk of new tokens; the `text` deltas concatenate to the final text."""

    type: Literal["token"] = "token"
    conversation_id: str
    token_ids: list[int]
    text: str


class StreamFinal(GenerateResponse):
    """The last event before `data: [DONE]`: the same body a non-streaming request returns."""

    type: Literal["final"] = "final"


class IntrinsicResponse(BaseModel):
    name: str = Field(description="The adapter that ran.")
    conversation_id: str | None = Field(description="The conversation used as context, if any (unchanged).")
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    ttft_s: float = Field(description="Seconds from the engine starting the request to its first token.")
    total_s: float = Field(description="Seconds from the engine receiving the request to its end.")
    error: str | None = Field(
        None,
        description='finish_reason "error" only: why the output constraint allowed no next token.',
        exclude_if=lambda v: v is None,  # absent otherwise: the documented bodies stay as they were
    )
    stop_reason: int | str | None = Field(
        None,
        description='finish_reason "stop" by a stop token id or stop string: which one (as vLLM\'s '
        "stop_reason); absent for end of text and every other finish.",
        exclude_if=lambda v: v is None,  # absent otherwise: the documented bodies stay as they were
    )
    activation_start: int | None = Field(
        description="aLoRA: first adapted position of the context (where the invocation starts)."
    )
    result: JsonValue = Field(
        None,
        description="The output processed per the adapter's io.yaml (granite-common's result "
        'processor: e.g. {"certainty": 0.45}), or parsed per a legacy alora_output.json; null if '
        "neither or unparsable.",
    )
    result_error: str | None = Field(None, description="Why `result` is null although a format is declared.")
    logprobs: list[dict[str, JsonValue]] | None = Field(
        None,
        description="With `logprobs: true` only: one entry per output token (OpenAI's chat shape).",
        exclude_if=lambda v: v is None,
    )
    prompt_token_ids: list[int] | None = Field(
        None,
        description="With `return_prompt_token_ids: true` only: the prompt the adapter ran on.",
        exclude_if=lambda v: v is None,
    )


class FanOutResponse(BaseModel):
    conversation_id: str | None = Field(description="The conversation used as context, if any (unchanged).")
    results: list[IntrinsicResponse] = Field(description="One result per requested intrinsic, in order.")


class IoSummary(BaseModel):
    response_format: JsonValue = Field(description="The output's JSON schema (null: free text).")
    transformations: list[str] = Field(description="Result rules applied in order (likelihood, nest...).")
    needs_logprobs: bool = Field(description="A rule reads the top-10 logprobs of the output tokens.")
    instruction: bool = Field(description="The rewriter appends an instruction turn.")
    parameters: dict[str, JsonValue] = Field(description="Request parameters the io.yaml sets.")


class AdapterInfo(BaseModel):
    name: str
    kind: Literal["lora", "alora"] = Field(description="alora: adapts only from its invocation on.")
    rank: int
    alpha: float
    target_modules: list[str]
    invocation_tokens: list[int] | None = Field(description="aLoRA invocation sequence (null for LoRA).")
    invocation_text: str | None
    output_format: OutputFormat | None = Field(
        description="Deprecated: how `result` is parsed from a legacy alora_output.json."
    )
    alias_of: str | None = Field(
        None, description="This name is an alias (e.g. a demo adapter's old name) of that adapter."
    )
    io: IoSummary | None = Field(None, description="The adapter's io.yaml, summarised (null: none).")
    io_yaml: str | None = Field(None, description="The io.yaml file's text, as written.")


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]


class ConversationInfo(BaseModel):
    conversation_id: str
    num_tokens: int = Field(description="Tokens of the committed history (inputs and outputs).")
    cached_tokens: int = Field(description="Leading tokens whose base KV is cached.")
    cache_location: str = Field(description="The coldest tier that KV needs: device, host, redis, or none.")


class HealthStatus(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyStatus(BaseModel):
    status: Literal["ready", "draining"]
    cache: Literal["ok", "degraded"] | None = Field(
        None,
        description="Health of the Redis cache tier (absent without --redis-url). degraded: Redis is "
        "unreachable; caches are recomputed and serving goes on (still ready).",
    )


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, for a human.")
    type: str = Field(description="Error class, e.g. invalid_request_error, not_found_error.")
    code: str = Field(description="Stable machine-readable code, e.g. unknown_conversation.")


class ErrorResponse(BaseModel):
    error: ErrorDetail
