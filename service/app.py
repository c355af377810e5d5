"""The FastAPI app: `create_app(settings)` wires middleware, routers and error handlers; the lifespan
loads the model and adapters (the offline demo without --model) and, on shutdown, waits for every
engine call still running.

    RequestTracking (in-flight, metrics) -> BodyGuard (size, UTF-8) -> routers -> EngineRunner -> Engine
"""

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import Message, Receive, Scope, Send

from alora_core.errors import AloraError
from service import package_version
from service.auth import Authenticator
from service.deps import ServiceState
from service.errors import install_error_handlers
from service.intrinsics.apply import load_intrinsic_ios
from service.loading import build_engine, load_output_formats, resolve_sources
from service.metrics import Metrics
from service.middleware import BodyGuard, Drain, RequestTracking
from service.openai import routes as openai_routes
from service.routers import adapters, conversations, generate, health, intrinsic
from service.runner import EngineRunner
from service.settings import Settings

log = logging.getLogger(__name__)

DESCRIPTION = """\
Serve a base causal LM plus LoRA and Activated-LoRA (aLoRA) adapters ("intrinsics") on reusable
per-conversation KV caches. Errors always have the body `{"error": {"message", "type", "code"}}`
(plus OpenAI's `param` on `/v1/...`). With API keys configured, send `Authorization: Bearer <key>`;
conversations are private to a key. The `/v1` routes speak the OpenAI API in vLLM's shapes.
"""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    try:
        sources = await anyio.to_thread.run_sync(resolve_sources, settings)
        intrinsic_ios = await anyio.to_thread.run_sync(load_intrinsic_ios, sources.adapters)
        engine = await anyio.to_thread.run_sync(build_engine, settings, sources)
        output_formats = load_output_formats(engine, set(intrinsic_ios))
    except AloraError as exc:  # refused on purpose (a model it cannot serve exactly, an unusable adapter)
        log.error("startup refused: %s", exc.message)  # one line; QuietRefusal drops the traceback
        app.state.startup_refused = True
        raise
    # threads for every request the engine can run or queue, and a few more: past that it answers 429
    runner = EngineRunner(max_concurrent_calls=engine.config.max_num_seqs + engine.config.max_waiting + 16)
    app.state.service = ServiceState(
        engine=engine,
        runner=runner,
        output_formats=output_formats,
        intrinsic_ios=intrinsic_ios,
        aliases=dict(sources.aliases),
        served_model_names=sources.served_model_names,
        model_root=sources.model,
        started=int(time.time()),
    )
    app.state.metrics.bind(engine, "demo" if sources.demo else sources.model)
    paths = app.openapi()["paths"]  # the route templates, as the middleware labels requests
    app.state.metrics.bind_routes((method.upper(), path) for path in paths for method in paths[path])
    names = ", ".join(f"{a.spec.name} ({a.spec.kind})" for a in engine.adapters.all()) or "none"
    log.info(
        "serving %s%s with adapters: %s",
        sources.model,
        " (DEMO, random weights)" if sources.demo else "",
        names,
    )
    yield
    app.state.drain.start()
    if runner.running:
        log.info("shutdown: waiting for %d engine call(s) still running", runner.running)
    await runner.wait_idle()
    await anyio.to_thread.run_sync(engine.close)


class QuietRefusal:
    """ASGI wrapper for uvicorn: a startup the lifespan refused on purpose, already logged as one line
    naming the reason, is reported without the traceback Starlette attaches to a failed lifespan."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def relay(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed" and getattr(
                self.app.state, "startup_refused", False
            ):
                message = {**message, "message": ""}
            await send(message)

        await self.app(scope, receive, relay if scope["type"] == "lifespan" else send)


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="alora-serve",
        version=package_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.auth = Authenticator(settings.api_keys())
    app.state.metrics = Metrics()
    app.state.drain = Drain()
    install_error_handlers(app)
    # add_middleware puts each new one outside the previous: tracking is the outermost
    app.add_middleware(BodyGuard, max_bytes=int(settings.max_request_bytes))
    app.add_middleware(RequestTracking, drain=app.state.drain, metrics=app.state.metrics)
    for module in (generate, intrinsic, adapters, conversations, health, openai_routes):
        app.include_router(module.router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, less its default 422 validation responses: validation errors are 400s with
    the one error body here (see service.errors), and a 422 means a missing aLoRA invocation."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for operations in schema["paths"].values():
            for operation in operations.values():
                default_422 = operation.get("responses", {}).get("422", {})
                if "HTTPValidationError" in str(default_422):
                    del operation["responses"]["422"]
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema
