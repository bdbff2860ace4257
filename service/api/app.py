"""The API process: ``uvicorn service.api.app:create_app --factory``. It never imports torch.

It validates, stores and enqueues jobs and serves their state and artifacts; all heavy work
happens in the Celery workers (``worker/``). The schema must exist (``rsavq db upgrade``): the app
never creates tables itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import httpx
from fastapi import FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select, text
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import errors
from service import jobs as machine
from service.api import openapi
from service.api.auth import KeyCache
from service.api.deps import Context
from service.api.middleware import BodyLimit, Observe
from service.api.observability import Metrics
from service.api.routes.artifacts import router as artifacts_router
from service.api.routes.datasets import router as datasets_router
from service.api.routes.generation import router as generation_router
from service.api.routes.jobs import router as jobs_router
from service.api.routes.sweeps import router as sweeps_router
from service.api.routes.tokenize import router as tokenize_router
from service.artifacts import ArtifactStore
from service.db import Job, session_factory
from service.errors import AuthenticationError, NotFoundError
from service.queue import broker_ok, make_celery
from service.settings import Settings, get_settings
from service.shared_secret import bearer_matches

DASHBOARD = Path(__file__).parent / "static" / "ui.html"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.ensure_dirs()
    sessions = session_factory(settings.database_url)

    def count_jobs() -> dict[str, int]:
        with sessions() as session:
            return dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())

    context = Context(
        settings=settings,
        sessions=sessions,
        celery=make_celery(settings),
        store=ArtifactStore(settings.artifact_dir),
        metrics=Metrics(count_jobs, machine.STATUSES),
        keys=KeyCache(settings.auth_cache_s),
    )
    app = FastAPIOffline(  # Swagger UI's assets from the package: /docs works without internet
        title="rsavq",
        version="0.1.0",
        description="Quantization as a service: RSAVQ and baselines for decoder-only LLMs. "
        "Authenticate with `Authorization: Bearer <key>` (`rsavq keys create NAME`).",
    )
    app.state.context = context
    errors.install(app)
    app.include_router(jobs_router)
    app.include_router(sweeps_router)
    app.include_router(datasets_router)
    app.include_router(artifacts_router)
    app.include_router(generation_router)
    app.include_router(tokenize_router)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """The framework's own errors (unknown route, wrong method, an unparsable body) in our shape."""
        kind = {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        body = errors.error_body(exc.status_code, str(exc.detail), kind)
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        message = "; ".join(f"{'.'.join(str(p) for p in d['loc'])}: {d['msg']}" for d in details)
        param = ".".join(str(p) for p in details[0]["loc"][1:]) if details and details[0]["loc"] else None
        return JSONResponse(
            {**errors.error_body(422, message, "ValidationError", param or None), "detail": details}, status_code=422
        )

    @app.get("/health", tags=["ops"])
    def health() -> JSONResponse:
        checks = {"database": _db_ok(context), "broker": broker_ok(context.celery)}
        ok = all(checks.values())
        # Reported, not part of the status: jobs work without it, only generation answers 503.
        generation = _generation_state(settings.generation_url)
        return JSONResponse(
            {"status": "ok" if ok else "degraded", **checks, "generation": generation}, status_code=200 if ok else 503
        )

    @app.get("/ui", include_in_schema=False)
    def dashboard() -> HTMLResponse:
        """The dashboard: one static page over this API (the key stays in the browser)."""
        headers = {
            "Cache-Control": "no-cache",
            "X-Frame-Options": "DENY",
            "Content-Security-Policy": "frame-ancestors 'none'",
        }
        return HTMLResponse(DASHBOARD.read_text(encoding="utf-8"), headers=headers)

    @app.get("/metrics", tags=["ops"], include_in_schema=False)
    def metrics(authorization: Annotated[str | None, Header()] = None) -> Response:
        """Operators' numbers, no tenant in them; who may read them is ``settings.metrics``."""
        if settings.metrics == "off":
            raise NotFoundError("metrics are off (RSAVQ_METRICS)")
        if settings.metrics == "token":
            token = settings.metrics_token
            if token is None or not bearer_matches(authorization, token.get_secret_value()):
                raise AuthenticationError("metrics need the operators' token (RSAVQ_METRICS_TOKEN)")
        return Response(generate_latest(context.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    openapi.install(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, larger={"/v1/datasets": settings.max_dataset_bytes})
    app.add_middleware(Observe, metrics=context.metrics)
    return app


def _generation_state(url: str | None) -> str:
    if not url:
        return "not configured"
    try:
        return "ok" if httpx.get(f"{url}/health", timeout=1.0).status_code == 200 else "unhealthy"
    except httpx.HTTPError:
        return "unreachable"


def _db_ok(context: Context) -> bool:
    try:
        with context.sessions() as session:
            session.execute(text("SELECT 1"))
        return True
    except Exception:  # any driver error means "not healthy"; /health reports it
        return False
