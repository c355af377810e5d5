"""GET / DELETE /conversations/{id}: a tenant's view of one of its conversations."""

from typing import Annotated

from fastapi import APIRouter, Path, Response

from service.deps import EngineDep, RunnerDep, TenantDep
from service.inputs import public_ids
from service.routers import error_responses
from service.schemas import ConversationInfo

router = APIRouter(tags=["conversations"])

ConversationIdPath = Annotated[str, Path(pattern=r"^[A-Za-z0-9._~-]{1,128}$")]


@router.get(
    "/conversations/{conversation_id}",
    response_model=ConversationInfo,
    responses=error_responses(400, 401, 404, 503),
    summary="Token count of a conversation and where its cache lies",
)
async def get_conversation(
    conversation_id: ConversationIdPath, engine: EngineDep, runner: RunnerDep, tenant: TenantDep
) -> ConversationInfo:
    key = tenant.key(conversation_id)

    def lookup() -> ConversationInfo:
        with public_ids(key, conversation_id):
            info = engine.conversation(key)
        return ConversationInfo(
            conversation_id=conversation_id,
            num_tokens=info.num_tokens,
            cached_tokens=info.cached_tokens,
            cache_location=info.cache_location,
        )

    return await runner.run(key, False, lookup)


@router.delete(
    "/conversations/{conversation_id}",
    status_code=204,
    response_class=Response,
    responses=error_responses(400, 401, 404, 409, 503),
    summary="Forget a conversation and free its cache",
)
async def delete_conversation(
    conversation_id: ConversationIdPath, engine: EngineDep, runner: RunnerDep, tenant: TenantDep
) -> Response:
    key = tenant.key(conversation_id)

    def delete() -> None:
        with public_ids(key, conversation_id):
            engine.delete_conversation(key)

    await runner.run(key, True, delete)
    return Response(status_code=204)
