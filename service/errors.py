"""Every error leaves the service as one JSON shape, mapped here once:

    {"error": {"message": "...", "type": "invalid_request_error", "code": "invalid_request"}}

On the OpenAI-compatible routes (`/v1/...`) the body also carries OpenAI's `param` (the request
field at fault, or null), so the openai SDK's error objects are complete.

Engine errors (`alora_core.errors`) carry their HTTP status; the service adds its own few below.
Request-validation and HTTP-routing errors are mapped to the same shape; anything unexpected is a
logged 500 that never shows internals.
"""

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from alora_core.errors import AloraError

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled_error",
    503: "unavailable_error",
}
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
OPENAI_PREFIX = "/v1/"


def is_openai(path: str) -> bool:
    """An OpenAI-compatible route: its error bodies carry `param`."""
    return path.startswith(OPENAI_PREFIX)


class ServiceError(Exception):
    """An error raised by the HTTP layer itself; like engine errors it carries its status and code."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param  # the request field at fault (OpenAI's `param`), if one is


class UnauthorizedError(ServiceError):
    status_code = 401
    code = "unauthorized"


class RequestTooLargeError(ServiceError):
    status_code = 413
    code = "request_too_large"


class InvalidBodyError(ServiceError):
    status_code = 400
    code = "invalid_request"


def error_body(
    status_code: int, code: str, message: str, *, openai: bool = False, param: str | None = None
) -> dict[str, Any]:
    detail: dict[str, Any] = {"message": message, "type": ERROR_TYPES.get(status_code, "server_error")}
    if openai:
        detail["param"] = param
    detail["code"] = code
    return {"error": detail}


def error_response(
    status_code: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    openai: bool = False,
    param: str | None = None,
) -> JSONResponse:
    if status_code == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    body = error_body(status_code, code, message, openai=openai, param=param)
    return JSONResponse(body, status_code=status_code, headers=headers)


def _validation_param(exc: RequestValidationError) -> str | None:
    """The first field at fault, dotted (`messages.0.content`), for OpenAI's `param`."""
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if loc and err.get("type") != "json_invalid":
            return ".".join(loc)
    return None


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "invalid JSON")
            parts.append(f"malformed JSON at character {err['loc'][-1]}: {detail}")
        else:
            message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            parts.append(f"{loc}: {message}" if loc else message)
    return "; ".join(parts) or "invalid request"


async def _alora_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AloraError | ServiceError)
    retry_after = getattr(exc, "retry_after_s", None)  # overload errors say when to come back
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    openai, param = is_openai(request.url.path), getattr(exc, "param", None)
    return error_response(exc.status_code, exc.code, exc.message, headers, openai=openai, param=param)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    openai = is_openai(request.url.path)
    return error_response(
        400, "invalid_request", _validation_message(exc), openai=openai, param=_validation_param(exc)
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = HTTP_CODES.get(exc.status_code, "invalid_request" if exc.status_code < 500 else "internal_error")
    return error_response(exc.status_code, code, str(exc.detail), openai=is_openai(request.url.path))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    openai = is_openai(request.url.path)
    return error_response(500, "internal_error", "internal server error (logged)", openai=openai)


class ClientDisconnected(Exception):
    """The client went away before its result: its engine request was cancelled."""


async def _client_gone(request: Request, exc: Exception) -> JSONResponse:
    # nobody reads this: the client closed the connection and its engine request was cancelled
    return error_response(499, "client_closed_request", "client closed the connection; request cancelled")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ClientDisconnected, _client_gone)
    app.add_exception_handler(AloraError, _alora_error)
    app.add_exception_handler(ServiceError, _alora_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
