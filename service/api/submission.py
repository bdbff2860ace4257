"""Creating jobs, shared by /v1/jobs (one budget) and /v1/sweeps (several): model-id rules, the
tenant's active-job limit, the job row and its first event, and the enqueue that either succeeds
or forgets the jobs (so a client's retry submits anew)."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rsavq_core.errors import ConfigError
from service import jobs as machine
from service.api.deps import Context
from service.api.schemas.jobs import HUB_ID, JobRequest
from service.db import Job, Sweep
from service.errors import ConflictError, TooManyRequestsError
from service.queue import QUANTIZE_TASK, enqueue

Keyed = TypeVar("Keyed", Job, Sweep)


def check_model_id(model_id: str, allow_local: bool) -> None:
    if HUB_ID.match(model_id):
        return
    if Path(model_id).is_absolute() and allow_local:
        return
    if Path(model_id).is_absolute() or model_id.startswith((".", "~")):
        raise ConfigError(
            f"model_id {model_id!r}: local paths are not allowed on this server "
            "(set RSAVQ_ALLOW_LOCAL_MODELS=true on a private deployment)"
        )
    raise ConfigError(f"model_id {model_id!r} is not a model id: use 'org/name', 'name' or a built-in alias")


def request_digest(body: BaseModel) -> str:
    """sha256 of a request body's canonical JSON: what an Idempotency-Key's retry must repeat."""
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def by_idempotency_key(
    session: Session, row_type: type[Keyed], tenant: str, key: str | None, request_hash: str
) -> Keyed | None:
    """The tenant's job or sweep created with this Idempotency-Key (None without a key); 409 if it
    had another body."""
    if not key:
        return None
    row = session.scalar(select(row_type).where(row_type.tenant == tenant, row_type.idempotency_key == key))
    if row is not None and row.request_hash != request_hash:
        raise ConflictError("this Idempotency-Key was used with a different request body")
    return row


def insert_or_retried(session: Session, row: Keyed, tenant: str, key: str | None, request_hash: str) -> Keyed:
    """Flush a new job or sweep; when a concurrent retry with the same Idempotency-Key won the
    insert (the unique constraint), the winner's row instead."""
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        existing = by_idempotency_key(session, type(row), tenant, key, request_hash)
        if existing is None:
            raise
        return existing
    return row


def within_tenant_limit(session: Session, tenant: str, limit: int, adding: int = 1) -> None:
    """429 when ``adding`` more jobs would take the tenant past ``limit`` jobs queued or running (a
    retry of an existing job, by its Idempotency-Key, is answered before this). Two submissions
    racing may both pass: the limit bounds a flood, it is not a quota."""
    active = session.scalar(select(func.count()).where(Job.tenant == tenant, Job.status.in_(machine.ACTIVE)))
    if (active or 0) + adding > limit:
        more = "" if adding == 1 else f" and this request adds {adding}"
        raise TooManyRequestsError(
            f"this key's tenant has {active} jobs queued or running{more}, the most allowed "
            f"(RSAVQ_TENANT_MAX_ACTIVE_JOBS={limit}); retry when one has finished",
            retry_after=60,
        )


def new_job(
    session: Session,
    tenant: str,
    body: JobRequest,
    request_hash: str,
    *,
    idempotency_key: str | None = None,
    sweep_id: str | None = None,
) -> Job:
    """A queued job of ``body`` added to the session (not flushed)."""
    job = Job(
        id=uuid.uuid4().hex,
        tenant=tenant,
        model_id=body.model_id,
        name=body.name,
        method=body.method,
        bits=body.bits,
        options=body.options.model_dump(mode="json", exclude_none=True),
        status=machine.QUEUED,
        stage="queued",
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        sweep_id=sweep_id,
    )
    session.add(job)
    return job


def enqueue_or_forget(ctx: Context, session: Session, job_ids: list[str], forget: Any = None) -> None:
    """Queue the committed jobs; if the broker refuses, delete them (and ``forget``, a statement
    run in the same transaction, e.g. their sweep) and re-raise: nothing half-accepted remains."""
    try:
        for job_id in job_ids:
            enqueue(ctx.celery, QUANTIZE_TASK, job_id)
    except Exception:
        session.execute(delete(Job).where(Job.id.in_(job_ids)))  # events go with them (ON DELETE CASCADE)
        if forget is not None:
            session.execute(forget)
        session.commit()
        raise
