"""One router per resource: generate, intrinsic, adapters, conversations, health (+ready, metrics)."""

from typing import Any

from pydantic import BaseModel

from service.schemas import ErrorResponse

_DESCRIPTIONS = {
    400: "Invalid request: malformed JSON, wrong types, bad values, missing or extra input forms.",
    401: "Missing or invalid API key.",
    404: "Unknown adapter or conversation.",
    409: "The conversation has a request in progress in the engine.",
    413: "Request body over --max-request-bytes, or context longer than the model maximum.",
    422: "aLoRA input without the adapter's invocation sequence.",
    429: "The engine's queue is full: retry after the Retry-After seconds.",
    503: "KV cache exhausted by other live requests, the Redis node holding an unknown conversation "
    "unreachable (cache_unavailable), or the service draining: retry later.",
}


def error_responses(
    *codes: int, model: type[BaseModel] = ErrorResponse, descriptions: dict[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can return (all with the one error body)."""
    text = {**_DESCRIPTIONS, **(descriptions or {})}
    return {code: {"model": model, "description": text[code]} for code in codes}
