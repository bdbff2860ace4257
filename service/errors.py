"""The service's errors, and the one place where every error becomes an HTTP status and body.

The library's hierarchy (``rsavq_core.errors``) is extended here by what only a service has::

    RSAVQError
      + ServiceError            errors of the job service (service/, worker/), by HTTP meaning:
          + AuthenticationError     missing, unknown or revoked API key          (401)
          + NotFoundError           no such job for this tenant                  (404)
          + ConflictError           wrong state for the request, key reuse, ... (409)
              + ArtifactDigestError     no artifact at that path with that sha256 (409)
          + PayloadTooLargeError    request body over the configured limit       (413)
          + TooManyRequestsError    over a per-tenant limit; says when to retry  (429)
          + UnavailableError        database, broker or generation server down  (503)
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from rsavq_core.errors import (
    ArtifactError,
    ConfigError,
    InsufficientMemoryError,
    ModelResolutionError,
    RSAVQError,
    UnsupportedModelError,
)


class ServiceError(RSAVQError):
    """Errors of the job service; ``STATUS`` below maps each subclass to one HTTP status."""


class AuthenticationError(ServiceError):
    """Missing, malformed, unknown or revoked API key."""


class NotFoundError(ServiceError):
    """The resource does not exist, or belongs to another tenant (never say which)."""


class ConflictError(ServiceError):
    """The request conflicts with the resource's state (artifact of an unfinished job, reused key)."""


class ArtifactDigestError(ConflictError):
    """No artifact at the path asked for (or one outside the store), or not with the sha256 asked for."""


class PayloadTooLargeError(ServiceError):
    """The request body is larger than the configured limit."""


class TooManyRequestsError(ServiceError):
    """Over a per-tenant limit (active jobs, concurrent generations); ``retry_after`` in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnavailableError(ServiceError):
    """A backing service (database, broker, generation server) is unreachable."""


# Most specific first: the first class an error is an instance of decides.
STATUS: list[tuple[type[RSAVQError], int]] = [
    (AuthenticationError, 401),
    (NotFoundError, 404),
    (ConflictError, 409),
    (PayloadTooLargeError, 413),
    (TooManyRequestsError, 429),
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
        if not isinstance(exc, RSAVQError):  # registered for RSAVQError only; keeps the type checker honest
            raise exc
        status = status_of(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if isinstance(exc, TooManyRequestsError):
            headers = {"Retry-After": str(exc.retry_after)}
        return JSONResponse(error_body(status, str(exc), type(exc).__name__), status_code=status, headers=headers)

    app.add_exception_handler(RSAVQError, handle)
