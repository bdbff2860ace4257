"""The one place where the library's exception hierarchy becomes HTTP statuses."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from rsavq_core.errors import (
    ArtifactError,
    AuthenticationError,
    ConfigError,
    ConflictError,
    InsufficientMemoryError,
    ModelResolutionError,
    NotFoundError,
    PayloadTooLargeError,
    RSAVQError,
    UnavailableError,
    UnsupportedModelError,
)

# Most specific first: the first class an error is an instance of decides.
STATUS: list[tuple[type[RSAVQError], int]] = [
    (AuthenticationError, 401),
    (NotFoundError, 404),
    (ConflictError, 409),
    (PayloadTooLargeError, 413),
    (ConfigError, 422),
    (ModelResolutionError, 422),
    (UnsupportedModelError, 422),
    (InsufficientMemoryError, 422),
    (UnavailableError, 503),
    (ArtifactError, 500),
]


def status_of(exc: RSAVQError) -> int:
    return next((code for cls, code in STATUS if isinstance(exc, cls)), 500)


def error_body(status: int, message: str, kind: str, param: str | None = None) -> dict[str, object]:
    """The one error shape. ``message``/``type``/``param``/``code`` are OpenAI's fields, so OpenAI
    clients of the generation endpoints read our errors as their own."""
    return {"error": {"status": status, "type": kind, "message": message, "param": param, "code": None}}


def install(app: FastAPI) -> None:
    async def handle(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RSAVQError)
        status = status_of(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse(error_body(status, str(exc), type(exc).__name__), status_code=status, headers=headers)

    app.add_exception_handler(RSAVQError, handle)
