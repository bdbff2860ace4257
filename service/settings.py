"""Service settings, from ``RSAVQ_*`` environment variables, with an embedded default.

With nothing set, everything lives under one data directory: a SQLite database, a SQLite
message broker (kombu's SQLAlchemy transport) and the artifact store, so one machine runs the whole
service with no Redis and no PostgreSQL. Setting ``RSAVQ_DATABASE_URL`` (PostgreSQL) and
``RSAVQ_BROKER_URL`` (Redis) turns the same code into a distributed deployment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rsavq_core.errors import ConfigError


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw not in (None, "") else default
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a number") from exc


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    return default if not raw else raw in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str
    broker_url: str
    artifact_dir: Path
    allow_local_models: bool = False  # may a job name a server-side path? never on a shared service
    max_body_bytes: int = 64 * 1024
    lease_seconds: float = 30.0  # a running job's lease; a worker renews it every lease/3 s
    requeue_after_seconds: float = 600.0  # re-send a queued job's message after this long (lost messages)
    soft_time_limit: float = 6 * 3600.0  # raises inside the task: the job fails with a clear message
    hard_time_limit: float = 6.5 * 3600.0  # the worker child is killed: the reaper then fails or resumes it
    worker_memory_gb: float | None = None  # capacity override for the pre-flight check
    max_attempts: int = 3  # deliveries of one job before it is failed (a job that kills its worker)
    generation_url: str | None = None
    sse_poll_seconds: float = 0.5  # how often the event stream looks for new events
    auth_cache_seconds: float = 0.0  # >0: verified keys are cached this long, so revocation lags by it

    @classmethod
    def from_env(cls, data_dir: str | Path | None = None) -> Settings:
        root = Path(data_dir or os.environ.get("RSAVQ_DATA_DIR") or Path.cwd() / "rsavq-data").resolve()
        memory = os.environ.get("RSAVQ_WORKER_MEMORY_GB")
        return cls(
            data_dir=root,
            database_url=os.environ.get("RSAVQ_DATABASE_URL") or f"sqlite:///{root / 'rsavq.db'}",
            broker_url=os.environ.get("RSAVQ_BROKER_URL") or f"sqla+sqlite:///{root / 'broker.db'}",
            artifact_dir=Path(os.environ.get("RSAVQ_ARTIFACT_DIR") or root / "artifacts"),
            allow_local_models=_bool("RSAVQ_ALLOW_LOCAL_MODELS", False),
            max_body_bytes=int(_float("RSAVQ_MAX_BODY_BYTES", 64 * 1024)),
            lease_seconds=_float("RSAVQ_LEASE_SECONDS", 30.0),
            requeue_after_seconds=_float("RSAVQ_REQUEUE_AFTER_S", 600.0),
            soft_time_limit=_float("RSAVQ_TASK_SOFT_LIMIT_S", 6 * 3600.0),
            hard_time_limit=_float("RSAVQ_TASK_HARD_LIMIT_S", 6.5 * 3600.0),
            worker_memory_gb=float(memory) if memory else None,
            max_attempts=int(_float("RSAVQ_MAX_ATTEMPTS", 3)),
            generation_url=os.environ.get("RSAVQ_GENERATION_URL") or None,
            auth_cache_seconds=_float("RSAVQ_AUTH_CACHE_S", 0.0),
        )

    def to_env(self) -> dict[str, str]:
        """The variables that make a child process (the embedded worker) see these settings."""
        env = {
            "RSAVQ_DATA_DIR": str(self.data_dir),
            "RSAVQ_DATABASE_URL": self.database_url,
            "RSAVQ_BROKER_URL": self.broker_url,
            "RSAVQ_ARTIFACT_DIR": str(self.artifact_dir),
            "RSAVQ_ALLOW_LOCAL_MODELS": str(self.allow_local_models).lower(),
            "RSAVQ_LEASE_SECONDS": str(self.lease_seconds),
            "RSAVQ_REQUEUE_AFTER_S": str(self.requeue_after_seconds),
            "RSAVQ_TASK_SOFT_LIMIT_S": str(self.soft_time_limit),
            "RSAVQ_TASK_HARD_LIMIT_S": str(self.hard_time_limit),
            "RSAVQ_MAX_ATTEMPTS": str(self.max_attempts),
        }
        if self.worker_memory_gb is not None:
            env["RSAVQ_WORKER_MEMORY_GB"] = str(self.worker_memory_gb)
        return env

    def ensure_dirs(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
