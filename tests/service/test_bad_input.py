"""Every kind of bad input is a clear 4xx with the one error body, never a 500, and the service
keeps serving afterwards."""

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.service.conftest import MAX_MODEL_LEN, MAX_REQUEST_BYTES

JSON = {"Content-Type": "application/json"}
OK_PROMPT = {"prompt": "hello", "max_tokens": 1}

# (name, path, request kwargs for httpx, status, error code)
CASES: list[tuple[str, str, dict[str, Any], int, str]] = [
    (
        "malformed json",
        "/generate",
        {"content": b'{"prompt": "hi", ', "headers": JSON},
        400,
        "invalid_request",
    ),
    ("json not an object", "/generate", {"json": ["prompt"]}, 400, "invalid_request"),
    (
        "not json content type",
        "/generate",
        {"content": b"prompt=hi", "headers": {"Content-Type": "text/plain"}},
        400,
        "invalid_request",
    ),
    ("empty body", "/generate", {"content": b"", "headers": JSON}, 400, "invalid_request"),
    (
        "invalid utf-8",
        "/generate",
        {"content": b'{"prompt": "\xff\xfe"}', "headers": JSON},
        400,
        "invalid_request",
    ),
    (
        "lone surrogate",
        "/generate",
        {"content": b'{"prompt": "\\ud800"}', "headers": JSON},
        400,
        "invalid_request",
    ),
    (
        "max_tokens wrong type",
        "/generate",
        {"json": {"prompt": "hi", "max_tokens": "ten"}},
        400,
        "invalid_request",
    ),
    ("messages wrong type", "/generate", {"json": {"messages": "hi"}}, 400, "invalid_request"),
    (
        "message missing content",
        "/generate",
        {"json": {"messages": [{"role": "user"}]}},
        400,
        "invalid_request",
    ),
    ("input_ids wrong type", "/generate", {"json": {"input_ids": ["a", "b"]}}, 400, "invalid_request"),
    ("input_ids booleans", "/generate", {"json": {"input_ids": [True, False]}}, 400, "invalid_request"),
    ("input_ids negative", "/generate", {"json": {"input_ids": [-1]}}, 400, "invalid_request"),
    ("input_ids outside vocabulary", "/generate", {"json": {"input_ids": [10**9]}}, 400, "invalid_request"),
    ("input_ids empty", "/generate", {"json": {"input_ids": []}}, 400, "invalid_request"),
    ("no input form", "/generate", {"json": {"max_tokens": 3}}, 400, "invalid_request"),
    ("two input forms", "/generate", {"json": {"prompt": "hi", "input_ids": [5, 6]}}, 400, "invalid_request"),
    (
        "three input forms",
        "/generate",
        {"json": {"prompt": "hi", "input_ids": [5], "messages": [{"role": "user", "content": "x"}]}},
        400,
        "invalid_request",
    ),
    ("unknown field", "/generate", {"json": {"prompt": "hi", "max_token": 3}}, 400, "invalid_request"),
    (
        "negative max_tokens",
        "/generate",
        {"json": {"prompt": "hi", "max_tokens": -1}},
        400,
        "invalid_request",
    ),
    ("zero max_tokens", "/generate", {"json": {"prompt": "hi", "max_tokens": 0}}, 400, "invalid_request"),
    (
        "huge max_tokens",
        "/generate",
        {"json": {"prompt": "hi", "max_tokens": 10**12}},
        400,
        "invalid_request",
    ),
    (
        "negative temperature",
        "/generate",
        {"json": {"prompt": "hi", "temperature": -0.5}},
        400,
        "invalid_request",
    ),
    ("huge temperature", "/generate", {"json": {"prompt": "hi", "temperature": 1e9}}, 400, "invalid_request"),
    (
        "NaN temperature",
        "/generate",
        {"content": b'{"prompt": "hi", "temperature": NaN}', "headers": JSON},
        400,
        "invalid_request",
    ),
    ("top_p zero", "/generate", {"json": {"prompt": "hi", "top_p": 0}}, 400, "invalid_request"),
    ("top_k negative", "/generate", {"json": {"prompt": "hi", "top_k": -3}}, 400, "invalid_request"),
    ("seed huge", "/generate", {"json": {"prompt": "hi", "seed": 2**70}}, 400, "invalid_request"),
    ("empty stop string", "/generate", {"json": {"prompt": "hi", "stop": [""]}}, 400, "invalid_request"),
    (
        "bad conversation id",
        "/generate",
        {"json": {"prompt": "hi", "conversation_id": "a/b c"}},
        400,
        "invalid_request",
    ),
    (
        "stream wrong type",
        "/generate",
        {"json": {"prompt": "hi", "stream": "yes please"}},
        400,
        "invalid_request",
    ),
    (
        "context over model length",
        "/generate",
        {"json": {"input_ids": [5] * MAX_MODEL_LEN, "max_tokens": 1}},
        413,
        "context_too_long",
    ),
    (
        "body over max-request-bytes",
        "/generate",
        {"json": {"prompt": "x" * MAX_REQUEST_BYTES}},
        413,
        "request_too_large",
    ),
    ("unknown adapter", "/intrinsic/no-such-adapter", {"json": OK_PROMPT}, 404, "unknown_adapter"),
    ("bad adapter name", "/intrinsic/bad name!", {"json": OK_PROMPT}, 400, "invalid_request"),
    (
        "intrinsic unknown conversation",
        "/intrinsic/certainty",
        {"json": {"conversation_id": "nope", "max_tokens": 1}},
        404,
        "unknown_conversation",
    ),
    (
        "intrinsic without context",
        "/intrinsic/certainty",
        {"json": {"max_tokens": 1}},
        400,
        "invalid_request",
    ),
    (
        "intrinsic two input forms",
        "/intrinsic/certainty",
        {"json": {"prompt": "a", "input_ids": [5]}},
        400,
        "invalid_request",
    ),
    (
        "missing invocation",
        "/intrinsic/certainty",
        {"json": {"prompt": "hi", "add_invocation": False}},
        422,
        "invocation_missing",
    ),
    (
        "intrinsic context over model length",
        "/intrinsic/rewrite",
        {"json": {"input_ids": [5] * MAX_MODEL_LEN}},
        413,
        "context_too_long",
    ),
    ("unknown route", "/no/such/route", {"json": {}}, 404, "not_found"),
]


@pytest.fixture(autouse=True)
def still_serving(client: httpx.Client) -> Iterator[None]:
    """After every bad request the service still answers a good one."""
    yield
    response = client.post("/generate", json=OK_PROMPT)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("name", "path", "kwargs", "status", "code"), CASES, ids=[c[0] for c in CASES])
def test_bad_request_is_a_clear_4xx(
    client: httpx.Client, name: str, path: str, kwargs: dict[str, Any], status: int, code: str
) -> None:
    response = client.post(path, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["code"] == code
    assert error["message"]


def test_context_too_long_states_both_numbers(client: httpx.Client) -> None:
    response = client.post("/generate", json={"input_ids": [5] * (MAX_MODEL_LEN + 10)})
    assert response.status_code == 413
    message = response.json()["error"]["message"]
    assert str(MAX_MODEL_LEN + 10) in message and str(MAX_MODEL_LEN) in message


def test_chunked_body_over_the_limit_is_413(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while reading
        yield b'{"prompt": "'
        for _ in range(MAX_REQUEST_BYTES // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    response = client.post("/generate", content=chunks(), headers=JSON)
    assert response.status_code == 413, response.text
    assert str(MAX_REQUEST_BYTES) in response.json()["error"]["message"]


def test_wrong_method_is_405(client: httpx.Client) -> None:
    response = client.get("/generate")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [("/conversations/nope", 404, "unknown_conversation"), ("/conversations/a%20b", 400, "invalid_request")],
)
def test_unknown_or_invalid_conversation_on_get_and_delete(
    client: httpx.Client, path: str, status: int, code: str
) -> None:
    for response in (client.get(path), client.delete(path)):
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code
