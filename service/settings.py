"""Service settings: ``RSAVQ_*`` environment variables, read once per process (pydantic-settings).

With nothing set, everything lives under one data directory: a SQLite database, a SQLite
message broker (kombu's SQLAlchemy transport) and the artifact store, so one machine runs the whole
service with no Redis and no PostgreSQL. Setting ``RSAVQ_DATABASE_URL`` (PostgreSQL) and
``RSAVQ_BROKER_URL`` (Redis) turns the same code into a distributed deployment.

Every field's variable is ``RSAVQ_`` + its name in upper case (``lease_seconds`` ->
``RSAVQ_LEASE_SECONDS``). ``Settings`` extends the library's ``CoreSettings`` (cache directory,
kernel policy), so one object serves both: ``get_settings`` installs it for the library too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator

from rsavq_core.settings import CoreSettings, configure, load_settings

# Triton's own variable: children inherit it from the environment as it was set.
_NOT_EXPORTED = {"triton_interpret"}


class Settings(CoreSettings):
    # Required here, filled by _derived: the defaults depend on the data dir.
    data_dir: Path = Field(description="database, broker and artifacts (default: ./rsavq-data)")
    database_url: str = Field(description="SQLAlchemy URL (default: SQLite in the data dir)")
    broker_url: str = Field(description="Celery broker URL (default: SQLite in the data dir)")
    artifact_dir: Path = Field(description="published artifacts (default: <data dir>/artifacts)")
    allow_local_models: bool = Field(False, description="may a job name a server-side path? never on a shared service")
    max_body_bytes: int = Field(64 * 1024, ge=1, description="largest request body")
    max_dataset_bytes: int = Field(
        64 * 2**20, ge=1, description="largest dataset upload (POST /v1/datasets), the one body over max_body_bytes"
    )
    lease_seconds: float = Field(30.0, gt=0, description="a running job's lease; its worker renews it every lease/3 s")
    requeue_after_s: float = Field(600.0, gt=0, description="re-send a queued job's message after this long")
    task_soft_limit_s: float = Field(6 * 3600.0, gt=0, description="raises inside the task: the job fails, saying so")
    task_hard_limit_s: float = Field(
        6.5 * 3600.0, gt=0, description="the worker child is killed; the reaper takes over"
    )
    worker_memory_gb: float | None = Field(None, gt=0, description="capacity override for the pre-flight check")
    max_attempts: int = Field(
        3, ge=1, description="deliveries of one job before it is failed (a job that kills workers)"
    )
    generation_url: str | None = Field(None, description="the generation server behind /v1/completions")
    generation_token: SecretStr | None = Field(
        None, description="shared secret the API shows the generation server (required by it; serve makes one)"
    )
    generation_memory_gb: float | None = Field(None, gt=0, description="cap on the generation server's loaded models")
    generation_max_tokens: int = Field(4096, ge=1, description="most new tokens one completion may ask for")
    generation_default_max_tokens: int = Field(
        256, ge=1, description="new tokens of a chat completion that names no max_tokens"
    )
    generation_deadline_s: float = Field(600.0, gt=0, description="a completion still running after this is stopped")
    generation_host: str = Field("127.0.0.1", description="where the generation server listens")
    generation_port: int = Field(8001, ge=1, le=65535, description="its port")
    generation_device: str | None = Field(
        None, description="its device: cuda, cuda:1, cpu (default: cuda when present)"
    )
    metrics: Literal["open", "token", "off"] = Field(
        "token", description="/metrics: open to anyone, only with RSAVQ_METRICS_TOKEN, or not served"
    )
    metrics_token: SecretStr | None = Field(None, description="bearer token of /metrics when metrics=token")
    # Fair sharing: one tenant's flood must not hold every worker slot or the generation server.
    tenant_max_active_jobs: int = Field(8, ge=1, description="queued + running jobs of one tenant; more is a 429")
    tenant_max_generations: int = Field(
        2, ge=1, description="concurrent completions of one tenant per API process; more is a 429"
    )
    sse_poll_seconds: float = Field(0.5, gt=0, description="how often an event stream looks for new events")
    auth_cache_s: float = Field(0.0, ge=0, description=">0: verified keys are cached this long (revocation lags by it)")
    # The command line's HTTP client (rsavq submit / status / wait / download / cancel).
    server: str = Field("http://127.0.0.1:8000", description="API URL the client talks to")
    api_key: SecretStr | None = Field(None, description="API key the client sends")

    @model_validator(mode="before")
    @classmethod
    def _derived(cls, data: Any) -> Any:
        """Fill what is unset (or set empty) from the data dir; ``data`` is the merged environment and arguments."""
        if not isinstance(data, dict):
            return data
        root = Path(data.get("data_dir") or Path.cwd() / "rsavq-data").resolve()
        derived = {
            "database_url": f"sqlite:///{root / 'rsavq.db'}",
            "broker_url": f"sqla+sqlite:///{root / 'broker.db'}",
            "artifact_dir": root / "artifacts",
        }
        return {**data, "data_dir": root, **{k: v for k, v in derived.items() if not data.get(k)}}

    @classmethod
    def from_env(cls, data_dir: str | Path | None = None, **values: Any) -> Settings:
        """Settings from the environment; ``data_dir`` (a ``--data-dir`` flag) and ``values`` win."""
        if data_dir is not None:
            values["data_dir"] = Path(data_dir)
        return load_settings(cls, **values)

    def to_env(self) -> dict[str, str]:
        """The variables that give a child process (a worker, the generation server) these settings."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None or name in _NOT_EXPORTED:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[f"RSAVQ_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
        return env

    def ensure_dirs(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.artifact_dir.mkdir(parents=True, exist_ok=True)


_settings: Settings | None = None


def get_settings() -> Settings:
    """This process's settings, read once, and installed as the library's settings too."""
    global _settings
    if _settings is None:
        _settings = Settings.from_env()
        configure(_settings)
    return _settings
