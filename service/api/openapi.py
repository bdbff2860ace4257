"""The OpenAPI document with every status code an operation can answer, each error in our one shape.

FastAPI documents an operation's success and its 422 (in FastAPI's own body, which is not ours).
The error statuses come from shared layers (authentication, the body limit, ``load_job``, the error
mapping of ``service.errors``), so they are added here from what an operation has: a security
requirement, a body, a job id, a name.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    status: int
    type: str = Field(description="the error's class, e.g. ValidationError, NotFoundError")
    message: str
    param: str | None = Field(None, description="the request field at fault, when one is")
    code: None = None


class ErrorBody(BaseModel):
    """Every error of the API and of the OpenAI-compatible endpoints (OpenAI's field names)."""

    error: ErrorDetail


WHY = {
    401: "missing, unknown or revoked API key",
    404: "no such job, sweep or dataset for this key (or a dataset a job names)",
    409: "not in a state that allows this (a job or sweep still running, a dataset a running job needs), "
    "or an Idempotency-Key reused with another body",
    413: "request body over the limit",
    422: "invalid request (fields, bounds, knob rules)",
    429: "over a limit of this key",
    502: "the generation server failed",
    503: "a backing service is unavailable",
    504: "the completion ran past its deadline",
}
# Answers of the artifact download that are not errors (no error body).
RANGES = {206: "the requested byte range", 304: "not modified (If-None-Match)", 416: "range not satisfiable"}
_CONFLICTS = ("/artifact", "/cancel", "/completions")


def _statuses(path: str, method: str, op: dict[str, Any]) -> set[int]:
    codes = {422} if (op.get("parameters") or "requestBody" in op) else set()
    if op.get("security"):
        codes.add(401)
    if "requestBody" in op:
        codes.add(413)
    if "{job_id}" in path or "{sweep_id}" in path or "{dataset_id}" in path or path in ("/v1/jobs", "/v1/sweeps"):
        codes.add(404)
    if method == "delete" or path.endswith(_CONFLICTS) or (path in ("/v1/jobs", "/v1/sweeps") and method == "post"):
        codes.add(409)  # POST /v1/jobs and /v1/sweeps: an Idempotency-Key reused with another body
    if (path in ("/v1/jobs", "/v1/sweeps") and method == "post") or path.endswith("/completions"):
        codes.add(429)  # the tenant's active jobs / concurrent completions
    if path.endswith("/completions"):
        codes |= {404, 502, 503, 504}
    if path in ("/tokenize", "/detokenize"):
        codes |= {404, 409, 502, 503}
    if path == "/health":
        codes.add(503)
    return codes


def install(app: FastAPI) -> None:
    """Replace ``app.openapi`` with one that documents every error status (computed once)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["ErrorBody"] = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in components["ErrorBody"].pop("$defs", {}).items():
            components[name] = definition
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
        for path, operations in schema.get("paths", {}).items():
            for method, op in operations.items():
                responses = op.setdefault("responses", {})
                for code in sorted(_statuses(path, method, op)):
                    documented = responses.setdefault(str(code), {"description": WHY[code]})
                    documented["content"] = error  # our shape, also for FastAPI's own 422 entry
                if path.endswith("/artifact"):
                    for code, why in RANGES.items():
                        responses[str(code)] = {"description": why}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
