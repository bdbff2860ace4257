"""What every request handler needs, built once per app and reached through ``request.app.state``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from celery import Celery
from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session, sessionmaker

from service.artifacts import ArtifactStore
from service.auth import authenticate
from service.observability import Metrics
from service.settings import Settings


@dataclass
class Context:
    settings: Settings
    sessions: sessionmaker
    celery: Celery
    store: ArtifactStore
    metrics: Metrics


def get_context(request: Request) -> Context:
    return request.app.state.context


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, shared by authentication and the handler (one connection checkout)."""
    with request.app.state.context.sessions() as session:
        yield session


# scope="function": the session is closed when the handler returns, not when a (streamed) response
# ends, so an event stream or a long download holds no pooled connection.
DbSession = Annotated[Session, Depends(get_session, scope="function")]


def tenant_of(session: DbSession,
              authorization: Annotated[str | None, Header()] = None) -> str:
    return authenticate(session, authorization)
