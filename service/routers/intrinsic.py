"""POST /intrinsic/{name} and POST /intrinsics (fan-out): run adapters on a conversation (or a given
input) without changing it."""

import asyncio
from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request

from alora_core import Engine
from alora_core.engine import EngineHandle
from alora_core.errors import InvalidRequestError
from alora_core.lora.adapters import AdapterSpec
from service.auth import Tenant
from service.deps import EngineDep, MetricsDep, RunnerDep, ServiceState, StateDep, TenantDep
from service.inputs import encode_chat, encode_input, public_ids, with_invocation
from service.intrinsics.apply import process, rewrite, sampling_defaults, template_inputs, with_io
from service.metrics import Metrics
from service.openai.logprobs import TokenStrings, chat_entries, token_strings
from service.outputs import ParsedOutput, parse_output
from service.routers import error_responses
from service.runner import EngineRunner, TokenCallback
from service.schemas import FanOutRequest, FanOutResponse, IntrinsicRequest, IntrinsicResponse, Usage

router = APIRouter(tags=["intrinsic"])

AdapterName = Annotated[
    str, Path(pattern=r"^[A-Za-z0-9._-]{1,128}$", description="A loaded adapter (see GET /adapters).")
]


@router.post(
    "/intrinsic/{name}",
    response_model=IntrinsicResponse,
    responses=error_responses(400, 401, 404, 413, 422, 429, 503),
    summary="Run an adapter (intrinsic) on a conversation",
)
async def intrinsic(
    name: AdapterName,
    body: IntrinsicRequest,
    request: Request,
    engine: EngineDep,
    runner: RunnerDep,
    state: StateDep,
    tenant: TenantDep,
    metrics: MetricsDep,
) -> IntrinsicResponse:
    """Context = the input if given, else the conversation's tokens; the adapter's invocation is
    appended unless the context already contains it. An aLoRA reuses the cached base KV up to its
    invocation; a plain LoRA reuses only its own earlier KV of the same context. Any cached prefix is
    reused, with or without a conversation (same API key and `cache_salt`). The conversation is never
    changed. `result` holds the output parsed per the adapter's output format, if it declares one."""
    engine.adapters.get(name)  # unknown -> 404 before any work
    return await run_intrinsic(name, body, request, engine, runner, state, tenant, metrics)


@router.post(
    "/intrinsics",
    response_model=FanOutResponse,
    responses=error_responses(400, 401, 404, 413, 422, 429, 503),
    summary="Run several intrinsics on one conversation in one call (fan-out)",
)
async def intrinsics(
    body: FanOutRequest,
    request: Request,
    engine: EngineDep,
    runner: RunnerDep,
    state: StateDep,
    tenant: TenantDep,
    metrics: MetricsDep,
) -> FanOutResponse:
    """Each item runs like POST /intrinsic/{name} on the same context; all are submitted at once, so
    they share engine steps and the conversation's cached prefix. If one fails, the others are
    cancelled and the call returns that error."""
    items = body.items()
    for name, _ in items:
        engine.adapters.get(name)  # any unknown adapter -> 404 before any work
    calls = [
        asyncio.ensure_future(run_intrinsic(name, item, request, engine, runner, state, tenant, metrics))
        for name, item in items
    ]
    try:
        results = await asyncio.gather(*calls)
    except BaseException:
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        raise
    return FanOutResponse(conversation_id=body.conversation_id, results=list(results))


async def run_intrinsic(
    name: str,
    body: IntrinsicRequest,
    request: Request,
    engine: Engine,
    runner: EngineRunner,
    state: ServiceState,
    tenant: Tenant,
    metrics: Metrics,
) -> IntrinsicResponse:
    adapter = engine.adapters.get(name)
    conversation_id = body.conversation_id
    key = tenant.key(conversation_id) if conversation_id is not None else None
    params = body.sampling_params()
    iio = state.intrinsic_ios.get(adapter.spec.name)
    if iio is not None:
        defaults = sampling_defaults(iio.config, body.model_fields_set)
        own_format = "response_format" in body.model_fields_set
        params = with_io(iio.config, replace(params, **defaults), own_format)
    elif body.instruction_args is not None:
        raise InvalidRequestError(f"adapter {name!r} has no io.yaml: instruction_args cannot apply")
    if body.logprobs and params.logprobs is None:
        params = replace(params, logprobs=0)  # the tokens' own logprobs, no alternatives
    documents = None if body.documents is None else [d.model_dump(exclude_none=True) for d in body.documents]
    if documents is not None and body.messages is None:
        raise InvalidRequestError("documents need `messages` (they go into the chat template)")
    rewritten = None

    def call(on_token: TokenCallback | None) -> EngineHandle:
        nonlocal rewritten
        with public_ids(key, conversation_id):
            if iio is not None and body.messages is not None:
                messages = [m.model_dump() for m in body.messages]
                rewritten = rewrite(iio, messages, documents, body.instruction_args or {})
                input_ids = chat_ids(engine, adapter.spec, *template_inputs(rewritten))
            elif iio is not None and iio.config.edits_messages:
                raise InvalidRequestError(
                    f"adapter {name!r}'s io.yaml rewrites the messages (instruction, sentence "
                    "boundaries or documents): give the input as `messages`"
                )
            elif documents is not None:
                messages = [m.model_dump() for m in body.messages or ()]
                input_ids = encode_chat(
                    engine.tokenizer, messages, add_generation_prompt=False, documents=documents
                )
            else:
                input_ids = encode_input(engine.tokenizer, body, generation_prompt=False)
            if not body.add_invocation and input_ids is None and key is not None:
                input_ids = engine.conversation_tokens(key)  # as is: the engine checks the invocation
            if body.add_invocation and input_ids is not None:
                input_ids = with_invocation(input_ids, adapter.spec.invocation_tokens)
            if body.return_prompt_token_ids:
                context = input_ids if input_ids is not None else engine.conversation_tokens(key or "")
                prompt.extend(with_invocation(context, adapter.spec.invocation_tokens))
            return engine.submit_intrinsic(
                name, key, input_ids, params, on_token, tenant=tenant.id, cache_salt=body.cache_salt
            )

    prompt: list[int] = []
    with public_ids(key, conversation_id):  # errors raised once queued, too
        result = await runner.call(key, False, call, request)
    metrics.record("intrinsic", result)
    logprobs = None
    if result.logprobs is not None:
        strings = TokenStrings(engine.tokenizer)
        texts = token_strings(strings.stepper(engine.loaded.eos_token_ids), result.token_ids)
        logprobs = [e.model_dump() for e in chat_entries(strings, texts, result.logprobs)]
    if iio is not None:
        value, error = process(iio, result.text, logprobs, rewritten)
        parsed = ParsedOutput(value=value, error=error)
    else:
        output_format = state.output_formats.get(adapter.spec.name)
        parsed = parse_output(output_format, result.text) if output_format is not None else ParsedOutput()
    return IntrinsicResponse(
        name=name,
        conversation_id=conversation_id,
        text=result.text,
        token_ids=result.token_ids,
        finish_reason=result.finish_reason,
        usage=Usage(**vars(result.usage)),
        ttft_s=result.ttft_s,
        total_s=result.total_s,
        error=result.error,
        stop_reason=result.stop_reason,
        activation_start=result.activation_start,
        result=parsed.value,
        result_error=parsed.error,
        logprobs=logprobs if body.logprobs else None,
        prompt_token_ids=prompt if body.return_prompt_token_ids else None,
    )


def chat_ids(
    engine: Engine, spec: AdapterSpec, messages: list[dict[str, Any]], documents: list[dict[str, Any]] | None
) -> list[int]:
    """A rewritten request's prompt as /v1/chat/completions renders it: an aLoRA's invocation takes
    the generation prompt's place (appended by the caller), a LoRA gets the generation prompt."""
    alora = spec.kind == "alora"
    return encode_chat(engine.tokenizer, messages, add_generation_prompt=not alora, documents=documents)
