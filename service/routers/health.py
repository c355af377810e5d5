"""Probes and metrics, never behind auth: GET /health (alive), /ready (serving), /metrics."""

from typing import Literal

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import DrainDep, EngineDep, MetricsDep
from service.schemas import HealthStatus, ReadyStatus

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthStatus, summary="Liveness: the process answers")
async def health() -> HealthStatus:
    return HealthStatus()


@router.get(
    "/ready",
    response_model=ReadyStatus,
    response_model_exclude_none=True,
    responses={503: {"model": ReadyStatus, "description": "Draining after SIGTERM: send no new traffic."}},
    summary="Readiness: model loaded and not draining",
)
async def ready(drain: DrainDep, engine: EngineDep) -> ReadyStatus | JSONResponse:
    # the server only listens once the lifespan has loaded the model, so "loaded" needs no check
    cache: Literal["ok", "degraded"] | None = None  # None: no Redis tier
    if engine.config.redis_url:  # Redis down is still ready: requests recompute
        cache = "degraded" if engine.cache_degraded else "ok"
    if drain.draining:
        body = ReadyStatus(status="draining", cache=cache).model_dump(exclude_none=True)
        return JSONResponse(body, status_code=503)
    return ReadyStatus(status="ready", cache=cache)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
    summary="Prometheus metrics (text exposition format)",
)
def metrics(metrics: MetricsDep) -> Response:  # a worker thread: the engine's stats take its lock
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
