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
from service import package_version
from service.deps import MetricsDep, StateDep, TenantDep
from service.errors import InvalidBodyError
from service.intrinsics.config import summary
from service.openai.assemble import (
    Meta,
    Prompts,
    Results,
    chat_body,
    completion_body,
    usage_of,
)
from service.openai.convert import (
    ADAPTER_KWARG,
    ModelNotFoundError,
    Target,
    chat_prompt,
    check_request,
    compile_constraint,
    constraint_of,
    encode_prompt,
    ending_ids,
    max_tokens,
    prompt_forms,
    resolve_target,
    sampling_params,
)
from service.openai.logprobs import (
    TokenStrings,
)
from service.openai.protocol import ChatCompletionRequest, CompletionRequest
from service.openai.responses import (
    ChatCompletionResponse,
    CompletionResponse,
    ModelCard,
    ModelList,
    OpenAIErrorResponse,
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
    adapters = []
    for a in engine.adapters.all():
        iio = state.intrinsic_ios.get(a.spec.name)
        for name in (a.spec.name, *engine.adapters.aliases_of(a.spec.name)):
            adapters.append(
                ModelCard(
                    id=name,
                    created=state.started,
                    root=str(a.spec.path),
                    parent=state.served_model_names[0],
                    max_model_len=engine.max_model_len,
                    kind=a.spec.kind,
                    alias_of=None if name == a.spec.name else a.spec.name,
                    io=None if iio is None else summary(iio.io),
                )
            )
    return base + adapters


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
    constraint = constraint_of(body)
    target = resolve_target(
        engine, state.served_model_names, body.model, (body.chat_template_kwargs or {}).get(ADAPTER_KWARG)
    )
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    prompt: list[int] = []  # filled on the worker thread, read once the engine has answered

    def submit(on_sample: ChoiceCallback | None) -> EngineHandle:
        compile_constraint(engine, body, constraint)
        prompt[:] = chat_prompt(engine.tokenizer, body, target)
        new = max_tokens(requested, len(prompt), engine.max_model_len, param)
        params = sampling_params(
            body, max_new=new, logprobs=logprobs, prompt_logprobs=body.prompt_logprobs, constraint=constraint
        )
        return engine.submit_completion(
            target.adapter, prompt, params, on_sample=on_sample, tenant=tenant.id, cache_salt=body.cache_salt
        )

    meta = Meta(
        id=f"chatcmpl-{body.request_id or uuid.uuid4().hex}",
        created=int(time.time()),
        model=target.response_model,
        strings=TokenStrings(engine.tokenizer),
        ending_ids=tuple(ending_ids(engine, body)),
    )
    if not body.stream:
        results = await state.runner.call_group([submit], request)
        record(metrics, "chat", results)
        return chat_body(body, meta, prompt, results)

    stream = state.runner.stream_group([submit], body.n)
    await stream.wait_first()  # an error before the first token is still a plain HTTP error
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    def usage(results: Results) -> dict[str, Any] | None:
        record(metrics, "chat", results)
        return usage_of([prompt], results).model_dump() if include_usage else None

    extra = {"prompt_token_ids": list(prompt)} if body.return_token_ids else {}
    events = chat_events(
        stream,
        Chunks(meta.id, "chat.completion.chunk", meta.created, meta.model, extra),
        body.n,
        lambda: IncrementalText(engine.tokenizer, body.stop_strings()),
        meta.strings if logprobs is not None else None,
        (lambda: meta.strings.stepper(meta.ending_ids)) if logprobs is not None else None,
        bool(body.return_token_ids),
        usage,
    )
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


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
    constraint = constraint_of(body)
    target: Target = resolve_target(engine, state.served_model_names, body.model, None)
    echo_only = body.max_tokens == 0  # echo: the prompt (and its logprobs), nothing generated
    k = body.logprobs
    if body.stream and body.echo and k is not None:
        raise InvalidBodyError("echo with logprobs is not available with stream: true", param="echo")
    engine_prompt_k = _max(body.prompt_logprobs, k if body.echo else None)
    forms = prompt_forms(body)
    prompts = Prompts(engine.tokenizer, len(forms))  # filled by each submit

    def submit_prompt(index: int) -> ChoiceCall:
        def submit(on_sample: ChoiceCallback | None) -> EngineHandle:
            compile_constraint(engine, body, constraint)
            form = forms[index]
            prompts.ids[index] = ids = encode_prompt(engine.tokenizer, form, body.add_special_tokens)
            prompts.texts[index] = form if isinstance(form, str) else None
            room = max_tokens(body.max_tokens, len(ids), engine.max_model_len, "max_tokens")
            params = sampling_params(
                body,
                max_new=1 if echo_only else room,
                logprobs=k,
                prompt_logprobs=engine_prompt_k,
                constraint=None if echo_only else constraint,
            )
            return engine.submit_completion(
                target.adapter, ids, params, on_sample=on_sample, tenant=tenant.id, cache_salt=body.cache_salt
            )

        return submit

    calls = [submit_prompt(i) for i in range(len(forms))]
    meta = Meta(
        id=f"cmpl-{body.request_id or uuid.uuid4().hex}",
        created=int(time.time()),
        model=target.response_model,
        strings=TokenStrings(engine.tokenizer),
        ending_ids=tuple(ending_ids(engine, body)),
    )
    if not body.stream:
        results = await state.runner.call_group(calls, request)
        record(metrics, "completion", results)
        return completion_body(body, meta, prompts, results)

    stream = state.runner.stream_group(calls, body.n)
    await stream.wait_first()
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    def usage(results: Results) -> dict[str, Any] | None:
        record(metrics, "completion", results)
        return usage_of(prompts.ids, results, echo_only).model_dump() if include_usage else None

    def prompt_of(choice: int) -> tuple[str, list[int]]:
        return prompts.echo_text(choice // body.n), prompts.ids[choice // body.n]

    events = completion_events(
        stream,
        Chunks(meta.id, "text_completion", meta.created, meta.model),
        len(forms) * body.n,
        lambda: IncrementalText(engine.tokenizer, body.stop_strings()),
        meta.strings if k is not None else None,
        (lambda: meta.strings.stepper(meta.ending_ids)) if k is not None else None,
        bool(body.return_token_ids),
        usage,
        prompt_of,
        body.echo,
        echo_only,
    )
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)
