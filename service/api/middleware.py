"""Pure-ASGI middleware of the API: the body-size limit and request metrics."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.responses import JSONResponse

from service import errors
from service.api.observability import Metrics

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class BodyLimit:
    """413 for a body over the limit, whether it declares its length or streams it (chunked).

    Small bodies are read here, up to the limit, before the app sees them: an error raised from
    inside FastAPI's own body parsing would reach the client as the framework's 400, not as our 413.
    Upload paths (``larger``) are not buffered here: their handler reads the body itself, after
    authentication, so an unauthenticated client cannot make the API hold megabytes; a body that
    passes the limit while the handler reads it raises PayloadTooLargeError there (413).
    """

    def __init__(self, app: Any, limit: int, larger: dict[str, int] | None = None) -> None:
        """``larger``: path -> the limit of that path's uploads (dataset uploads), instead of ``limit``."""
        self.app, self.default, self.larger = app, limit, larger or {}

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.larger.get(scope.get("path", ""), self.default)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject(send, limit)
            return
        if scope.get("path", "") in self.larger:
            await self.app(scope, _counting(receive, limit), send)
            return
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > limit:
                await self._reject(send, limit)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later messages (a disconnect) come from the client as they happen

        await self.app(scope, replay, send)

    async def _reject(self, send: Send, limit: int) -> None:
        body = JSONResponse(
            errors.error_body(413, f"request body over {limit} bytes", "PayloadTooLargeError"), status_code=413
        )
        await send({"type": "http.response.start", "status": 413, "headers": body.raw_headers})
        await send({"type": "http.response.body", "body": body.body})


def _counting(receive: Receive, limit: int) -> Receive:
    """``receive`` that raises PayloadTooLargeError once the body passes ``limit`` bytes."""
    seen = 0

    async def counted() -> dict[str, Any]:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise errors.PayloadTooLargeError(f"request body over {limit} bytes")
        return message

    return counted


class Observe:
    """Request counts and latency by route template (pure ASGI: no per-request task or body copy)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def capture(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - started)
