"""Service fixtures: a migrated database (SQLite in a temp dir, or a fresh PostgreSQL schema) and
an API client with keys. Integration fixtures (real Redis/PostgreSQL, worker processes) live in
test_integration.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    from service.migrate import upgrade

    s = Settings.from_env(tmp_path / "data")
    s = Settings(
        **{
            **s.__dict__,
            "database_url": f"sqlite:///{tmp_path / 'data' / 'rsavq.db'}",
            "broker_url": f"sqla+sqlite:///{tmp_path / 'data' / 'broker.db'}",
            "artifact_dir": tmp_path / "data" / "artifacts",
            "sse_poll_seconds": 0.05,
            "auth_cache_s": 0.0,
            "metrics_token": SecretStr("ops-token"),
        }
    )
    s.ensure_dirs()
    upgrade(s.database_url)
    return s


@pytest.fixture
def sessions(settings: Settings):
    from service.db import session_factory

    return session_factory(settings.database_url)


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    from service.api.app import create_app

    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def keys(sessions) -> dict[str, str]:
    from service.api.auth import create_key

    with sessions() as session:
        return {"alice": create_key(session, "alice"), "bob": create_key(session, "bob")}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379"


def _reachable(check) -> str | None:
    try:
        check()
        return None
    except Exception as exc:  # any failure means "not available": the integration tests say which
        return str(exc)


def _unavailable(message: str) -> None:
    """Skip, saying why; in CI (``RSAVQ_REQUIRE_SERVICES=1``, set by .ci/run) fail instead: a
    server that did not start must not turn the integration tests into silent skips."""
    if os.environ.get("RSAVQ_REQUIRE_SERVICES") == "1":
        pytest.fail(message + " (RSAVQ_REQUIRE_SERVICES=1: required here)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database, migrated by Alembic, dropped afterwards."""
    import uuid

    from sqlalchemy import create_engine, text

    from service.migrate import upgrade

    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    problem = _reachable(lambda: admin.connect().close())
    if problem:
        _unavailable(f"PostgreSQL not reachable at {PG_ADMIN} (.ci/run starts it): {problem}")
    name = f"rsavq_test_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    upgrade(url)
    yield url
    from service.db import get_engine

    get_engine(url).dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def pg_sessions(pg_url: str):
    from service.db import session_factory

    return session_factory(pg_url)


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    problem = _reachable(lambda: redis.Redis.from_url(REDIS, socket_timeout=2).ping())
    if problem:
        _unavailable(f"Redis not reachable at {REDIS} (.ci/run starts it): {problem}")
    return REDIS + "/11"
