"""The OpenAI-compatible routes (vLLM's shapes): GET /version, GET /v1/models, POST
/v1/chat/completions and /v1/completions, on the same runner, engine and errors as the native API.

    body --validate--> target (model / adapter) --worker thread--> prompt ids, SamplingParams
         --> engine.submit_completion (n choices fork one prefill) --> response or SSE chunks
"""

import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import StreamingResponse

from alora_core import GenerationResult
from alora_core.engine import ChoiceCallback, EngineHandle
from alora_core.sampling import TokenLogprobs
from service import package_version
from service.deps import MetricsDep, StateDep, TenantDep
from service.errors import InvalidBodyError
from service.openai.convert import (
    ADAPTER_KWARG,
    ModelNotFoundError,
    Target,
    chat_prompt,
    check_request,
    encode_prompt,
    ending_ids,
    max_tokens,
    prompt_forms,
    resolve_target,
    sampling_params,
)
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
    ModelCard,
    ModelList,
    OpenAIErrorResponse,
    PromptTokensDetails,
    UsageInfo,
    VersionInfo,
)
from service.openai.stream import Chunks, chat_events, completion_events
from service.routers import error_responses
from service.routers.generate import SSE_HEADERS, STREAM_RESPONSE
from service.runner import ChoiceCall
from service.streaming import IncrementalText

router = APIRouter(tags=["openai"])

_DESCRIPTIONS = {
    404: "Unknown model or adapter (`model`, `chat_template_kwargs.adapter_name`).",
    413: "Request body over --max-request-bytes, or prompt longer than the model maximum.",
}


def openai_errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return error_responses(*codes, model=OpenAIErrorResponse, descriptions=_DESCRIPTIONS)


@router.get("/version", response_model=VersionInfo, summary="The server's version (vLLM's shape)")
async def version() -> VersionInfo:
    return VersionInfo(version=package_version())


@router.get(
    "/v1/models",
    response_model=ModelList,
    responses=openai_errors(401),
    summary="The base model and adapters",
)
async def list_models(state: StateDep, tenant: TenantDep) -> ModelList:
    return ModelList(data=model_cards(state))


@router.get(
    "/v1/models/{model}",
    response_model=ModelCard,
    responses=openai_errors(400, 401, 404),
    summary="One model card",
)
async def retrieve_model(
    model: Annotated[str, Path(min_length=1, max_length=256)], state: StateDep, tenant: TenantDep
) -> ModelCard:
    for card in model_cards(state):
        if card.id == model:
            return card
    raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model")


def model_cards(state: Any) -> list[ModelCard]:
    engine = state.engine
    base = [
        ModelCard(
            id=name,
            created=state.started,
            root=state.model_root,
            max_model_len=engine.max_model_len,
            kind="base",
        )
        for name in state.served_model_names
    ]
    adapters = [
        ModelCard(
            id=a.spec.name,
            created=state.started,
            root=str(a.spec.path),
            parent=state.served_model_names[0],
            max_model_len=engine.max_model_len,
            kind=a.spec.kind,
        )
        for a in engine.adapters.all()
    ]
    return base + adapters


def usage_of(
    prompts: list[list[int]], results: list[list[GenerationResult]], echo_only: bool = False
) -> UsageInfo:
    """Prompt tokens once per prompt, completion tokens of every choice, cached tokens per prompt."""
    prompt_tokens = sum(len(p) for p in prompts)
    completion = 0 if echo_only else sum(len(r.token_ids) for choices in results for r in choices)
    cached = sum(choices[0].usage.cached_tokens for choices in results)
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def record(metrics: Any, endpoint: str, results: list[list[GenerationResult]]) -> None:
    for choices in results:
        for i, result in enumerate(choices):
            metrics.record(endpoint, result, count_prompt=i == 0)  # the prompt once per prompt


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    response_model_exclude_none=False,
    responses={200: STREAM_RESPONSE, **openai_errors(400, 401, 404, 413, 422, 429, 503)},
    summary="Chat completion with the base model or an adapter",
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, state: StateDep, tenant: TenantDep, metrics: MetricsDep
) -> ChatCompletionResponse | StreamingResponse:
    """The chat template renders `messages` (with `documents` and `chat_template_kwargs`); an aLoRA
    whose invocation the conversation lacks gets it in place of the generation prompt."""
    engine = state.engine
    check_request(body)
    target = resolve_target(
        engine, state.served_model_names, body.model, (body.chat_template_kwargs or {}).get(ADAPTER_KWARG)
    )
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    prompt: list[int] = []  # filled on the worker thread, read once the engine has answered

    def submit(on_sample: ChoiceCallback | None) -> EngineHandle:
        prompt[:] = chat_prompt(engine.tokenizer, body, target)
        new = max_tokens(requested, len(prompt), engine.max_model_len, param)
        params = sampling_params(body, max_new=new, logprobs=logprobs, prompt_logprobs=body.prompt_logprobs)
        # KV index (issue 15): tenant.id and body.cache_salt salt this request's prefix-cache keys
        return engine.submit_completion(target.adapter, prompt, params, on_sample=on_sample)

    response_id = f"chatcmpl-{body.request_id or uuid.uuid4().hex}"
    created = int(time.time())
    strings = TokenStrings(engine.tokenizer)
    if body.stream:
        stream = state.runner.stream_group([submit], body.n)
        await stream.wait_first()  # an error before the first token is still a plain HTTP error
        extra = {"prompt_token_ids": list(prompt)} if body.return_token_ids else {}
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        def usage(results: list[list[GenerationResult]]) -> dict[str, Any]:
            record(metrics, "chat", results)
            return usage_of([prompt], results).model_dump()

        events = chat_events(
            stream,
            Chunks(response_id, "chat.completion.chunk", created, target.response_model, extra),
            body.n,
            lambda: IncrementalText(engine.tokenizer, body.stop_strings()),
            strings if logprobs is not None else None,
            (lambda: strings.stepper(ending_ids(engine, body))) if logprobs is not None else None,
            bool(body.return_token_ids),
            usage if include_usage else _recording(metrics, "chat"),
        )
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)

    results = await state.runner.call_group([submit], request)
    record(metrics, "chat", results)
    choices = []
    for index, result in enumerate(results[0]):
        choice_logprobs = None
        if logprobs is not None:
            texts = token_strings(strings.stepper(ending_ids(engine, body)), result.token_ids)
            choice_logprobs = chat_logprobs(strings, texts, result.logprobs or [])
        choices.append(
            ChatChoice(
                index=index,
                message=AssistantMessage(content=result.text),
                logprobs=choice_logprobs,
                finish_reason=result.finish_reason,
                token_ids=result.token_ids if body.return_token_ids else None,
            )
        )
    first = results[0][0]
    return ChatCompletionResponse(
        id=response_id,
        created=created,
        model=target.response_model,
        choices=choices,
        usage=usage_of([prompt], results),
        prompt_token_ids=prompt if body.return_token_ids else None,
        prompt_logprobs=prompt_logprobs(strings, prompt, first.prompt_logprobs or [])
        if body.prompt_logprobs is not None
        else None,
    )


def _recording(metrics: Any, endpoint: str) -> Any:
    """A usage callback that only records the metrics (no usage chunk asked)."""

    def record_only(results: list[list[GenerationResult]]) -> None:
        record(metrics, endpoint, results)

    return record_only


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={200: STREAM_RESPONSE, **openai_errors(400, 401, 404, 413, 422, 429, 503)},
    summary="Text completion of one or more prompts with the base model or an adapter",
)
async def create_completion(
    body: CompletionRequest, request: Request, state: StateDep, tenant: TenantDep, metrics: MetricsDep
) -> CompletionResponse | StreamingResponse:
    """`prompt`: a string, strings, token ids or lists of them; choice index = prompt * n + choice.
    An aLoRA prompt must contain the adapter's invocation (422 otherwise)."""
    engine = state.engine
    check_request(body)
    target: Target = resolve_target(engine, state.served_model_names, body.model, None)
    echo_only = body.max_tokens == 0  # echo: the prompt (and its logprobs), nothing generated
    k = body.logprobs
    if body.stream and body.echo and k is not None:
        raise InvalidBodyError("echo with logprobs is not available with stream: true", param="echo")
    engine_prompt_k = _max(body.prompt_logprobs, k if body.echo else None)
    forms = prompt_forms(body)
    prompts: list[tuple[list[int], str | None]] = [([], None)] * len(forms)  # filled by each submit

    def submit_prompt(index: int) -> ChoiceCall:
        def submit(on_sample: ChoiceCallback | None) -> EngineHandle:
            ids = encode_prompt(engine.tokenizer, forms[index], body.add_special_tokens)
            prompts[index] = (ids, forms[index] if isinstance(forms[index], str) else None)
            new = (
                1 if echo_only else max_tokens(body.max_tokens, len(ids), engine.max_model_len, "max_tokens")
            )
            params = sampling_params(body, max_new=new, logprobs=k, prompt_logprobs=engine_prompt_k)
            # KV index (issue 15): tenant.id and body.cache_salt salt this request's prefix-cache keys
            return engine.submit_completion(target.adapter, ids, params, on_sample=on_sample)

        return submit

    calls = [submit_prompt(i) for i in range(len(forms))]
    response_id = f"cmpl-{body.request_id or uuid.uuid4().hex}"
    created = int(time.time())
    strings = TokenStrings(engine.tokenizer)

    def echo_text(index: int) -> str:
        ids, text = prompts[index]
        return text if text is not None else str(engine.tokenizer.decode(ids, skip_special_tokens=False))

    def echo_parts(
        index: int, result: GenerationResult | None
    ) -> tuple[str, list[int], list[str], list[Any]]:
        """(text, ids, token strings, logprob entries) of prompt `index` as echo prepends them."""
        ids, _ = prompts[index]
        if k is None or result is None:
            return echo_text(index), ids, [], []
        texts = token_strings(strings.stepper((), skip_special_tokens=False), ids)
        entries = [None, *(_trim(e, k) for e in result.prompt_logprobs or [])]
        return echo_text(index), ids, texts, entries

    if body.stream:
        stream = state.runner.stream_group(calls, body.n)
        await stream.wait_first()
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        def echo(choice: int) -> tuple[str, list[int], list[str], list[Any]]:
            return echo_parts(choice // body.n, None)  # streamed: text only (logprobs refused above)

        def usage(results: list[list[GenerationResult]]) -> dict[str, Any]:
            record(metrics, "completion", results)
            return usage_of([p for p, _ in prompts], results, echo_only).model_dump()

        events = completion_events(
            stream,
            Chunks(response_id, "text_completion", created, target.response_model),
            len(prompts) * body.n,
            lambda: IncrementalText(engine.tokenizer, body.stop_strings()),
            strings if k is not None else None,
            (lambda: strings.stepper(ending_ids(engine, body))) if k is not None else None,
            bool(body.return_token_ids),
            usage if include_usage else _recording(metrics, "completion"),
            echo if body.echo else None,
            echo_only,
        )
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)

    results = await state.runner.call_group(calls, request)
    record(metrics, "completion", results)
    choices = []
    for p, choice_results in enumerate(results):
        ids, _ = prompts[p]
        for c, result in enumerate(choice_results):
            tokens = [] if echo_only else result.token_ids
            text = "" if echo_only else result.text
            texts: list[str] = []
            entries: list[Any] = []
            if body.echo:
                _, _, texts, entries = echo_parts(p, result)
                text = echo_text(p) + text
            choice_logprobs = None
            if k is not None:
                out = token_strings(strings.stepper(ending_ids(engine, body)), tokens)
                own = [] if echo_only else list(result.logprobs or [])
                choice_logprobs = completion_logprobs(strings, texts + out, entries + own)
            choices.append(
                CompletionChoice(
                    index=p * body.n + c,
                    text=text,
                    logprobs=choice_logprobs,
                    finish_reason="length" if echo_only else result.finish_reason,
                    prompt_logprobs=prompt_logprobs(
                        strings, ids, [_trim(e, body.prompt_logprobs) for e in result.prompt_logprobs or []]
                    )
                    if body.prompt_logprobs is not None
                    else None,
                    prompt_token_ids=ids if body.return_token_ids else None,
                    token_ids=tokens if body.return_token_ids else None,
                )
            )
    return CompletionResponse(
        id=response_id,
        created=created,
        model=target.response_model,
        choices=choices,
        usage=usage_of([p for p, _ in prompts], results, echo_only),
    )


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def _trim(entry: TokenLogprobs, k: int | None) -> TokenLogprobs:
    return entry if k is None else TokenLogprobs(entry.logprob, entry.rank, entry.top[:k])
