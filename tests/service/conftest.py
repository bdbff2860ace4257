"""Service fixtures: a migrated database (SQLite in a temp dir, or a fresh PostgreSQL schema) and
an API client with keys. Integration fixtures (real Redis/PostgreSQL, worker processes) live in
test_integration.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    from service.migrate import upgrade

    s = Settings.from_env(tmp_path / "data")
    s = Settings(**{**s.__dict__, "database_url": f"sqlite:///{tmp_path / 'data' / 'rsavq.db'}",
                    "broker_url": f"sqla+sqlite:///{tmp_path / 'data' / 'broker.db'}",
                    "artifact_dir": tmp_path / "data" / "artifacts", "sse_poll_seconds": 0.05})
    s.ensure_dirs()
    upgrade(s.database_url)
    return s


@pytest.fixture
def sessions(settings: Settings):  # type: ignore[no-untyped-def]
    from service.db import session_factory

    return session_factory(settings.database_url)


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    from service.app import create_app

    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def keys(sessions) -> dict[str, str]:  # type: ignore[no-untyped-def]
    from service.auth import create_key

    with sessions() as session:
        return {"alice": create_key(session, "alice"), "bob": create_key(session, "bob")}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
