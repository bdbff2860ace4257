"""What every request handler needs, built once per app and reached through ``request.app.state``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from celery import Celery
from fastapi import Header, Request
from sqlalchemy.orm import sessionmaker

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


def tenant_of(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    ctx: Context = request.app.state.context
    with ctx.sessions() as session:
        return authenticate(session, authorization)
