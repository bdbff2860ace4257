"""What every request handler needs, built once per app and reached through ``request.app.state``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from celery import Celery
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from service.api.auth import KeyCache
from service.api.generation_limits import TenantSlots
from service.api.observability import Metrics
from service.artifacts import ArtifactStore
from service.settings import Settings


@dataclass
class Context:
    settings: Settings
    sessions: sessionmaker[Session]
    celery: Celery
    store: ArtifactStore
    metrics: Metrics
    keys: KeyCache
    generation_client: Any = None  # httpx.AsyncClient to the generation server, made on first use
    generation_slots: TenantSlots = field(default_factory=TenantSlots)


# async: FastAPI runs a sync dependency in the thread pool, and each hop costs more than these do.
async def get_context(request: Request) -> Context:
    context: Context = request.app.state.context
    return context


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One session per request, shared by authentication and the handler (one connection checkout).

    Creating a Session does no I/O (it connects on first use, in the handler's thread), so this
    runs on the event loop instead of costing two thread-pool hops per request.
    """
    session = request.app.state.context.sessions()
    try:
        yield session
    finally:
        session.close()


# scope="function": the session is closed when the handler returns, not when a (streamed) response
# ends, so an event stream or a long download holds no pooled connection.
DbSession = Annotated[Session, Depends(get_session, scope="function")]


# In the OpenAPI as an HTTP bearer security scheme, so clients and generators know how to log in;
# a missing or malformed header is our 401 (auto_error=False), not the framework's 403.
BEARER = HTTPBearer(auto_error=False, description="an API key (`rsavq keys create NAME`)")


def tenant_of(
    request: Request,
    session: DbSession,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)] = None,
) -> str:
    authorization = f"Bearer {credentials.credentials}" if credentials is not None else None
    try:
        tenant: str = request.app.state.context.keys.tenant(session, authorization)
        return tenant
    finally:
        # End the read transaction: its connection goes back to the pool while this request waits
        # for a thread to run its handler, so no connection is held by a request that is not running.
        session.rollback()
