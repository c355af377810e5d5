"""Schemathesis against the running server's own OpenAPI schema: generated valid and invalid requests
to every operation must never get a 5xx, nor a response that breaks the schema (status, content
type, body), and invalid ones must be rejected. Bounded and deterministic: a few examples per
operation and mode, derandomized."""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.service.conftest import KEY_A, ServerProcess

MAX_EXAMPLES = 12
OPERATIONS = [
    ("POST", "/generate"),
    ("POST", "/intrinsic/{name}"),
    ("POST", "/intrinsics"),
    ("GET", "/adapters"),
    ("GET", "/conversations/{conversation_id}"),
    ("DELETE", "/conversations/{conversation_id}"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("GET", "/version"),
]
CHECKS = [
    schemathesis.checks.not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def api_schema(server: ServerProcess) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


WITH_INPUT = OPERATIONS[:6] + OPERATIONS[9:11] + OPERATIONS[12:13]  # probes and lists take no input
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in WITH_INPUT
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_operation_conforms_to_its_schema(
    api_schema: schemathesis.BaseSchema, method: str, path: str, mode: GenerationMode
) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case) -> None:
        headers = {**(case.headers or {}), "Authorization": f"Bearer {KEY_A}"}  # a real key: past auth
        case.call_and_validate(headers=headers, timeout=60, checks=CHECKS)

    run()


def test_schema_documents_every_route_and_the_error_body(server: ServerProcess) -> None:
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops} == set(OPERATIONS)
    generate = spec["paths"]["/generate"]["post"]["responses"]
    assert set(generate) >= {"200", "400", "401", "413", "503"}
    assert generate["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }
    assert "422" not in generate  # FastAPI's validation body is replaced by the one error shape
