"""SQLAlchemy 2 models and the engine. The schema is created by Alembic (``migrations/``), never here.

Times are naive UTC datetimes (SQLite has no time zones; both backends then compare alike).
"""

from __future__ import annotations

import datetime as dt
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(128))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the whole key
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings, never enough to authenticate
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency"),
        Index("ix_jobs_tenant_name", "tenant", "name"),
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    model_id: Mapped[str] = mapped_column(String(512), index=True)
    name: Mapped[str | None] = mapped_column(String(128), nullable=True)  # /v1/completions' model alias
    method: Mapped[str] = mapped_column(String(16))
    bits: Mapped[float] = mapped_column(Float)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), index=True)
    stage: Mapped[str] = mapped_column(String(32), default="queued")
    done: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    percent: Mapped[float] = mapped_column(Float, default=0.0)
    eta_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    progress_detail: Mapped[dict[str, float] | None] = mapped_column(JSON, nullable=True)  # e.g. {"loss": ...}
    effective_bpw: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    enqueued_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    sweep_id: Mapped[str | None] = mapped_column(
        ForeignKey("sweeps.id", ondelete="SET NULL"), nullable=True, index=True
    )  # the sweep that created this job, if any


class Sweep(Base):
    """One request with several bit budgets: one job per budget (``Job.sweep_id``)."""

    __tablename__ = "sweeps"
    __table_args__ = (UniqueConstraint("tenant", "idempotency_key", name="uq_sweeps_tenant_idempotency"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    model_id: Mapped[str] = mapped_column(String(512))
    method: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    bits: Mapped[list[float]] = mapped_column(JSON)  # the budgets, in the order asked
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)  # sha256 of the request body


class Dataset(Base):
    """A tenant's own text for calibration or evaluation, stored in the artifact store."""

    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(128))
    format: Mapped[str] = mapped_column(String(8))  # text | jsonl
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    documents: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(1024))  # relative to the artifact store's root
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)


class JobEvent(Base):
    """Every status change and progress step, in order; the SSE stream replays these."""

    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))  # status | progress | layer
    data: Mapped[dict[str, Any]] = mapped_column(JSON)


class JobLayer(Base):
    """One finished layer: bits per group, proxy error, seconds."""

    __tablename__ = "job_layers"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    report: Mapped[dict[str, Any]] = mapped_column(JSON)


class Artifact(Base):
    __tablename__ = "artifacts"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    path: Mapped[str] = mapped_column(String(1024))  # relative to the artifact store's root
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class JobMetrics(Base):
    __tablename__ = "job_metrics"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Worker(Base):
    """Live workers, their memory and device, for the pre-flight check ("can any worker hold this job?")."""

    __tablename__ = "workers"
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    memory_bytes: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    device: Mapped[str] = mapped_column(String(64), default="cpu", server_default="cpu")  # "cpu", "cuda:0"
    device_memory_bytes: Mapped[float | None] = mapped_column(Float, nullable=True)  # None on the CPU


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    """One engine per URL and process. SQLite: WAL and a busy timeout, so API and worker share it."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=20, max_overflow=20
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    # 40 = Starlette's thread pool: each request holds at most one connection, so no request waits
    # for the pool while another holds one it waits on (e.g. two inserts racing on one unique key).
    return create_engine(url, pool_pre_ping=True, pool_size=20, max_overflow=20)


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)
