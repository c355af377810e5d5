"""Two pure-ASGI middlewares around every route:

RequestTracking  in-flight count (what a SIGTERM drain waits for) and request metrics
  BodyGuard      body over --max-request-bytes -> 413; body not UTF-8 -> 400; else replayed as is
    routes
"""

import time
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response, is_openai
from service.metrics import Metrics

DISCARD_LIMIT = 64 << 20  # past this many bytes of an oversized body, answer 413 without reading on
ERROR_BODY_LIMIT = 4096  # an error body is read this far for its code (metrics)


@dataclass
class Drain:
    """Shutdown state shared by the readiness route, the tracking middleware and the server."""

    draining: bool = False
    since: float = 0.0  # time.monotonic() of the drain signal
    in_flight: int = 0

    def start(self) -> None:
        if not self.draining:
            self.draining = True
            self.since = time.monotonic()


class RequestTracking:
    def __init__(self, app: ASGIApp, drain: Drain, metrics: Metrics) -> None:
        self.app = app
        self.drain = drain
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client sees when the app fails before starting a response
        error_body = b""  # the first body chunk of an error response (for its code)

        async def send_tracked(message: Message) -> None:
            nonlocal status, error_body
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400 and not error_body:
                error_body = message.get("body", b"")[:ERROR_BODY_LIMIT]
            await send(message)

        self.drain.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_tracked)
        finally:
            self.drain.in_flight -= 1
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.record_http(scope["method"], route, scope["path"], status, error_body)


class BodyGuard:
    """Reads the whole body before the app sees it (the app would anyway), enforcing its limits."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size <= self.max_bytes:
                chunks.append(chunk)
            elif size > DISCARD_LIMIT:
                break  # stop reading an absurd body; the connection is closed after the answer
        if size > self.max_bytes:
            response = error_response(
                413,
                "request_too_large",
                f"request body is {size}{'+' if more else ''} bytes; the limit is {self.max_bytes} "
                "(--max-request-bytes)",
                openai=is_openai(scope["path"]),
            )
            await response(scope, receive, send)
            return
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            response = error_response(
                400,
                "invalid_request",
                f"request body is not valid UTF-8 (byte {exc.start}: {exc.reason})",
                openai=is_openai(scope["path"]),
            )
            await response(scope, receive, send)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later messages: http.disconnect (streaming responses watch it)

        await self.app(scope, replay, send)
