"""OpenAI requests -> what the engine runs: the adapter, the prompt token ids, the SamplingParams.

    model            served base name | adapter name | base name + chat_template_kwargs.adapter_name
    chat prompt      chat template (documents, chat_template_kwargs, generation prompt) -> ids;
                     an aLoRA whose invocation the rendered conversation lacks: the invocation takes
                     the generation prompt's place (as the native /intrinsic appends it)
    completion       string(s) tokenized (add_special_tokens), or token ids as given
    sampling         OpenAI's defaults (temperature 1), max_tokens absent = up to the context limit

Everything here raises 400 / 404 errors that name the field at fault (OpenAI's `param`).
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from alora_core import Engine, SamplingParams
from alora_core.errors import AloraError
from alora_core.sampling import MAX_TOKENS_LIMIT
from alora_core.structured import OutputConstraint
from service.errors import InvalidBodyError, ServiceError
from service.inputs import contains, encode_chat
from service.openai.protocol import (
    NOT_IMPLEMENTED,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingRequest,
)
from service.structured import GUIDED, output_constraint

MAX_LOGIT_BIAS = 100.0  # vLLM clamps biases to [-100, 100]
CONSTRAINT_FIELDS = ("response_format", "structured_outputs", *GUIDED)
CONSTRAINT_FIELDS += ("guided_whitespace_pattern", "guided_decoding_backend")
ADAPTER_KWARG = "adapter_name"  # chat_template_kwargs key that selects an adapter (Granite Switch)


class ModelNotFoundError(ServiceError):
    status_code = 404
    code = "model_not_found"


def refuse(message: str, param: str | None) -> InvalidBodyError:
    return InvalidBodyError(message, param=param)


@dataclass(frozen=True)
class Target:
    """What a request runs on."""

    adapter: str | None  # engine adapter name; None = the base model
    kind: str  # "base" | "lora" | "alora"
    invocation: tuple[int, ...] | None  # aLoRA: its invocation token ids
    response_model: str  # the response's `model`


def resolve_target(engine: Engine, served: tuple[str, ...], model: str | None, adapter_name: Any) -> Target:
    """`model` = a served base name (default) or an adapter; chat_template_kwargs.adapter_name picks
    an adapter with the base name. Unknown -> 404 naming it."""
    model = served[0] if model is None else model
    names = {
        n for a in engine.adapters.all() for n in (a.spec.name, *engine.adapters.aliases_of(a.spec.name))
    }
    if adapter_name is not None:
        if not isinstance(adapter_name, str) or adapter_name not in names:
            raise ModelNotFoundError(
                f"The adapter `{adapter_name}` (chat_template_kwargs.adapter_name) does not exist.",
                param=f"chat_template_kwargs.{ADAPTER_KWARG}",
            )
        if model not in served and model != adapter_name:
            raise refuse(
                f"model `{model}` and chat_template_kwargs.adapter_name `{adapter_name}` disagree: "
                "give the base model's name with adapter_name, or the adapter's name as model",
                "model",
            )
        chosen, response_model = adapter_name, model
    elif model in served:
        return Target(None, "base", None, model)
    elif model in names:
        chosen, response_model = model, model
    else:
        raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model")
    spec = engine.adapters.get(chosen).spec
    return Target(chosen, spec.kind, spec.invocation_tokens, response_model)


def check_request(body: SamplingRequest) -> None:
    """400s naming the field: combinations that make no sense, and known fields given a value this
    service does not implement (it would otherwise silently ignore them)."""
    if body.stream_options is not None and not body.stream:
        raise refuse("stream_options can only be set with stream: true", "stream_options")
    if body.prompt_logprobs is not None and body.stream:
        raise refuse("prompt_logprobs are not available with stream: true", "prompt_logprobs")
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs and not body.logprobs:
            raise refuse("top_logprobs needs logprobs: true", "top_logprobs")
        if body.continue_final_message and body.add_generation_prompt:
            raise refuse(
                "continue_final_message and add_generation_prompt cannot both be true",
                "continue_final_message",
            )
        if body.max_tokens == 0:
            raise refuse("max_tokens must be at least 1", "max_tokens")
    if isinstance(body, CompletionRequest) and body.max_tokens == 0 and not body.echo:
        raise refuse("max_tokens: 0 is only meaningful with echo: true", "max_tokens")
    extra = body.model_extra or {}
    for name, defaults in NOT_IMPLEMENTED.items():
        if name in extra and not any(extra[name] == d and type(extra[name]) is type(d) for d in defaults):
            raise refuse(f"{name} is not supported by this server (only its default is accepted)", name)
    if body.tools is not None:
        raise refuse(
            "tools are not supported (no tool-call parsing): send tools: null or leave it out", "tools"
        )
    if body.tool_choice not in (None, "none"):
        raise refuse('tool_choice must be "none" or null: tools are not supported', "tool_choice")
    if body.stream_options is not None and body.stream_options.continuous_usage_stats:
        raise refuse("continuous_usage_stats is not supported", "stream_options.continuous_usage_stats")
    if isinstance(body, ChatCompletionRequest) and body.echo:
        raise refuse("echo is not supported on chat completions", "echo")
    if isinstance(body, CompletionRequest):
        if body.suffix:
            raise refuse("suffix is not supported", "suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise refuse("best_of other than n is not supported", "best_of")


# -- prompts -------------------------------------------------------------------------------------------


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template sees them: text parts joined with newlines; every other field
    (tool_calls, tool_call_id, name, ...) as the client sent it."""
    out = []
    for i, message in enumerate(messages):
        content: Any = message.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise refuse(
                        f"only text content parts are supported, got {part.type!r}",
                        f"messages.{i}.content.{j}",
                    )
            content = "\n".join(part.text or "" for part in content)
        out.append({"role": message.role, "content": content, **(message.model_extra or {})})
    return out


def chat_prompt(tokenizer: PreTrainedTokenizerBase, body: ChatCompletionRequest, target: Target) -> list[int]:
    """The chat request's prompt token ids (on a worker thread: templating and tokenization)."""
    kwargs = dict(body.chat_template_kwargs or {})
    kwargs.pop(ADAPTER_KWARG, None)
    if body.reasoning_effort is not None:
        kwargs.setdefault("reasoning_effort", body.reasoning_effort)
    generation_prompt = (
        body.add_generation_prompt
        if body.add_generation_prompt is not None
        else not body.continue_final_message
    )
    messages = template_messages(body.messages)

    def encode(add_generation_prompt: bool) -> list[int]:
        return encode_chat(
            tokenizer,
            messages,
            add_special_tokens=body.add_special_tokens,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=body.continue_final_message,
            documents=body.documents,
            template_kwargs=kwargs,
        )

    if target.kind == "alora" and generation_prompt and target.invocation:
        conversation = encode(add_generation_prompt=False)
        if not contains(conversation, target.invocation):  # the invocation replaces the generation prompt
            return conversation + list(target.invocation)
    return encode(generation_prompt)  # an aLoRA prompt without its invocation: 422 from the engine


def prompt_forms(body: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completion request: strings or token id lists."""
    prompt = body.prompt
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt[0], int):
        return [[int(t) for t in prompt]]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, form: str | list[int], add_special_tokens: bool
) -> list[int]:
    if isinstance(form, str):
        return list(tokenizer.encode(form, add_special_tokens=add_special_tokens))
    return list(form)


# -- sampling ------------------------------------------------------------------------------------------


def logit_bias(body: SamplingRequest) -> tuple[tuple[int, float], ...]:
    out = []
    for key, value in (body.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise refuse(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
        out.append((token, min(MAX_LOGIT_BIAS, max(-MAX_LOGIT_BIAS, value))))
    return tuple(out)


def max_tokens(requested: int | None, prompt_len: int, max_model_len: int, param: str) -> int:
    """Absent: up to the context limit (vLLM). Given: the prompt and it must fit the context."""
    room = max_model_len - prompt_len
    if requested is None:
        return max(1, min(room, MAX_TOKENS_LIMIT))  # no room at all: the engine answers 413
    if requested > room and room >= 1:
        raise refuse(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the "
            f"completion). Please reduce the length of the prompt or the completion.",
            param,
        )
    return min(requested, MAX_TOKENS_LIMIT)


def constraint_of(body: SamplingRequest) -> OutputConstraint | None:
    """The output constraint the request asks for (400 naming the field when it is malformed)."""
    return output_constraint({name: getattr(body, name) for name in CONSTRAINT_FIELDS})


def compile_constraint(engine: Engine, body: SamplingRequest, constraint: OutputConstraint | None) -> None:
    """Compile (or find cached) the request's grammar on the calling worker thread, so a grammar
    llguidance rejects is a 400 naming the field it came from, before any work."""
    if constraint is None:
        return
    try:
        engine.grammars.compile(constraint)
    except AloraError as exc:
        text = body.response_format is not None and body.response_format.get("type") == "text"
        given = [
            n
            for n in CONSTRAINT_FIELDS
            if getattr(body, n) is not None and not (text and n == "response_format")
        ]
        field = given[0] if given else "response_format"
        raise refuse(f"{field}: {exc.message}", field) from None


def sampling_params(
    body: SamplingRequest,
    *,
    max_new: int,
    logprobs: int | None,
    prompt_logprobs: int | None,
    constraint: OutputConstraint | None = None,
) -> SamplingParams:
    top_k = body.top_k or 0
    return SamplingParams(
        max_tokens=max_new,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if top_k < 0 else top_k,
        min_p=body.min_p or 0.0,
        seed=body.seed,
        stop=tuple(body.stop_strings()),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logit_bias=logit_bias(body),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        n=body.n,
        constraint=constraint,
    )


def ending_ids(engine: Engine, body: SamplingRequest) -> Iterable[int]:
    """Tokens that end a choice (shown as themselves in logprobs)."""
    eos = () if body.ignore_eos else engine.loaded.eos_token_ids
    return (*eos, *(body.stop_token_ids or ()))
