"""The service's shared state and the FastAPI dependencies that hand it to routes."""

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from alora_core import Engine
from service.auth import Authenticator, Tenant
from service.intrinsics.apply import IntrinsicIo
from service.loading import OutputFormats
from service.metrics import Metrics
from service.middleware import Drain
from service.runner import EngineRunner


@dataclass
class ServiceState:
    """Built by the lifespan once the engine is loaded; lives on `app.state.service`."""

    engine: Engine
    runner: EngineRunner
    output_formats: OutputFormats
    served_model_names: tuple[str, ...] = ("model",)  # the base model's names in the OpenAI API
    model_root: str | None = None  # its directory (GET /v1/models `root`)
    started: int = 0  # unix time the model was loaded (`created` of the model cards)
    intrinsic_ios: dict[str, IntrinsicIo] = field(default_factory=dict)  # adapter -> its io.yaml
    aliases: dict[str, str] = field(default_factory=dict)  # other name -> adapter (old demo names)


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


def get_engine(request: Request) -> Engine:
    return get_state(request).engine


def get_runner(request: Request) -> EngineRunner:
    return get_state(request).runner


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


def get_drain(request: Request) -> Drain:
    drain: Drain = request.app.state.drain
    return drain


_bearer = HTTPBearer(auto_error=False, description="An API key given with --api-key / --api-keys-file.")


def get_tenant(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Tenant:
    auth: Authenticator = request.app.state.auth
    return auth.tenant(credentials.credentials.strip() if credentials is not None else None)


StateDep = Annotated[ServiceState, Depends(get_state)]
EngineDep = Annotated[Engine, Depends(get_engine)]
RunnerDep = Annotated[EngineRunner, Depends(get_runner)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
DrainDep = Annotated[Drain, Depends(get_drain)]
TenantDep = Annotated[Tenant, Depends(get_tenant)]
