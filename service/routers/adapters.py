"""GET /adapters: the adapters this service runs."""

from fastapi import APIRouter

from service.deps import StateDep, TenantDep
from service.intrinsics.config import summary
from service.routers import error_responses
from service.schemas import AdapterInfo, AdapterList, IoSummary

router = APIRouter(tags=["adapters"])


@router.get(
    "/adapters",
    response_model=AdapterList,
    responses=error_responses(401),
    summary="List the loaded adapters",
)
async def list_adapters(state: StateDep, tenant: TenantDep) -> AdapterList:
    adapters = []
    engine = state.engine
    for resident in engine.adapters.all():
        spec = resident.spec
        iio = state.intrinsic_ios.get(spec.name)
        for name in (spec.name, *engine.adapters.aliases_of(spec.name)):  # an alias: the same adapter
            adapters.append(
                AdapterInfo(
                    name=name,
                    kind=spec.kind,
                    rank=spec.rank,
                    alpha=spec.alpha,
                    target_modules=list(spec.target_modules),
                    invocation_tokens=list(spec.invocation_tokens) if spec.invocation_tokens else None,
                    invocation_text=spec.invocation_text,
                    output_format=state.output_formats.get(spec.name),
                    alias_of=None if name == spec.name else spec.name,
                    io=None if iio is None else IoSummary(**summary(iio.io)),
                    io_yaml=None if iio is None else iio.io.text,
                )
            )
    return AdapterList(adapters=adapters)
