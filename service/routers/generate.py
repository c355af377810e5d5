"""POST /generate: a base-model turn of a conversation (the input is its full history)."""

import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from alora_core import GenerationResult
from alora_core.engine import EngineHandle
from service.deps import EngineDep, MetricsDep, RunnerDep, TenantDep
from service.inputs import encode_input, public_ids
from service.routers import error_responses
from service.runner import TokenCallback
from service.schemas import GenerateRequest, GenerateResponse, StreamFinal, Usage
from service.streaming import generate_events

router = APIRouter(tags=["generate"])

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of events

STREAM_RESPONSE = {
    "description": "With `stream: true`: server-sent events (token chunks, the final body, `[DONE]`).",
    "content": {
        "text/event-stream": {  # before OpenAPI 3.2, `schema` describes one event
            "schema": {
                "type": "object",
                "properties": {"data": {"type": "string", "description": "A JSON object, or `[DONE]`."}},
                "required": ["data"],
            }
        }
    },
}


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={200: STREAM_RESPONSE, **error_responses(400, 401, 413, 429, 503)},
    summary="Continue a conversation with the base model",
)
async def generate(
    body: GenerateRequest,
    request: Request,
    engine: EngineDep,
    runner: RunnerDep,
    tenant: TenantDep,
    metrics: MetricsDep,
) -> GenerateResponse | StreamingResponse:
    """Input = the conversation's FULL history (one of messages / prompt / input_ids). The longest
    prefix already cached is reused (`usage.cached_tokens`), whichever request computed it (same API
    key and `cache_salt`); the history and the output become the conversation's new state. Without
    `conversation_id` a new one is made (its id is returned, to continue it)."""
    conversation_id = body.conversation_id or uuid.uuid4().hex
    key = tenant.key(conversation_id)
    params = body.sampling_params()

    def call(on_token: TokenCallback | None) -> EngineHandle:
        with public_ids(key, conversation_id):
            input_ids = encode_input(engine.tokenizer, body, generation_prompt=True)
            assert input_ids is not None  # the schema requires exactly one input form
            return engine.submit_generate(
                key, input_ids, params, on_token, tenant=tenant.id, cache_salt=body.cache_salt
            )

    def respond(result: GenerationResult) -> GenerateResponse:
        metrics.record("generate", result)
        return GenerateResponse(
            conversation_id=conversation_id,
            text=result.text,
            token_ids=result.token_ids,
            finish_reason=result.finish_reason,
            usage=Usage(**vars(result.usage)),
            ttft_s=result.ttft_s,
            total_s=result.total_s,
            error=result.error,
            stop_reason=result.stop_reason,
        )

    if not body.stream:
        with public_ids(key, conversation_id):  # errors raised once queued, too
            return respond(await runner.call(key, True, call, request))
    stream = runner.stream(key, True, call)
    with public_ids(key, conversation_id):
        await stream.wait_first()  # an error before the first token is still a plain HTTP error
    events = generate_events(
        stream, conversation_id, engine.tokenizer, body.stop, lambda r: StreamFinal(**respond(r).model_dump())
    )
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
