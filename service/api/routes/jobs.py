"""/v1/jobs: submit, read, list, cancel, delete, and the progress event stream."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import re
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy import delete, select
from sqlalchemy.orm import Session
from sse_starlette import EventSourceResponse, ServerSentEvent

from rsavq_core.errors import ConfigError
from service import jobs as machine
from service.api.deps import BEARER, Context, DbSession, get_context, tenant_of
from service.api.routes.datasets import check_job_datasets
from service.api.schemas.jobs import JobList, JobOut, JobProgress, JobRequest
from service.api.submission import (
    by_idempotency_key,
    check_model_id,
    enqueue_or_forget,
    insert_or_retried,
    new_job,
    request_digest,
    within_tenant_limit,
)
from service.artifacts import ArtifactStore
from service.db import Job, JobEvent, JobLayer
from service.errors import ConflictError, NotFoundError

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
Tenant = Annotated[str, Depends(tenant_of)]
Ctx = Annotated[Context, Depends(get_context)]


def job_out(job: Job, layers: list[JobLayer] | None = None) -> JobOut:
    base = f"/v1/jobs/{job.id}"
    return JobOut(
        id=job.id,
        name=job.name,
        status=job.status,
        model_id=job.model_id,
        method=job.method,
        bits=job.bits,
        options=job.options,
        progress=JobProgress(
            stage=job.stage,
            done=job.done,
            total=job.total,
            percent=round(job.percent, 2),
            eta_seconds=job.eta_seconds,
            detail=job.progress_detail,
        ),
        effective_bpw=job.effective_bpw,
        error=job.error,
        attempts=job.attempts,
        cancel_requested=job.cancel_requested,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        updated_at=job.updated_at,
        layers=None if layers is None else [{"name": row.name, **row.report} for row in layers],
        links={"self": base, "events": f"{base}/events", "metrics": f"{base}/metrics", "artifact": f"{base}/artifact"},
    )


def load_job(session: Session, tenant: str, job_id: str) -> Job:
    """The tenant's job; another tenant's job is indistinguishable from a missing one (404)."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.tenant != tenant:
        raise NotFoundError(f"no job {job_id!r}")
    return job


@router.post("", status_code=202, response_model=JobOut)
def submit(
    body: JobRequest,
    response: Response,
    tenant: Tenant,
    ctx: Ctx,
    session: DbSession,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobOut:
    check_model_id(body.model_id, ctx.settings.allow_local_models)
    body.quant_config()  # every cross-field rule, before anything is stored
    check_job_datasets(session, tenant, ArtifactStore(ctx.settings.artifact_dir), body)
    request_hash = request_digest(body)
    existing = by_idempotency_key(session, Job, tenant, idempotency_key, request_hash)
    if existing is not None:
        return _accepted(response, existing)
    within_tenant_limit(session, tenant, ctx.settings.tenant_max_active_jobs)
    job = new_job(session, tenant, body, request_hash, idempotency_key=idempotency_key)
    winner = insert_or_retried(session, job, tenant, idempotency_key, request_hash)
    if winner is not job:  # a concurrent retry with the same key won the insert
        return _accepted(response, winner)
    machine.add_event(session, job.id, "status", {"status": machine.QUEUED})
    session.commit()
    enqueue_or_forget(ctx, session, [job.id])
    ctx.metrics.jobs_submitted.labels(method=body.method).inc()
    return _accepted(response, job)


def _accepted(response: Response, job: Job) -> JobOut:
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_out(job)


@router.get("", response_model=JobList)
def list_jobs(
    tenant: Tenant,
    session: DbSession,
    status: Annotated[str | None, Query()] = None,
    model_id: Annotated[str | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query()] = None,
) -> JobList:
    if status is not None and status not in machine.STATUSES:
        raise ConfigError(f"unknown status {status!r}; one of {', '.join(machine.STATUSES)}")
    query = select(Job).where(Job.tenant == tenant)
    if status:
        query = query.where(Job.status == status)
    if model_id:
        query = query.where(Job.model_id == model_id)
    if cursor:  # keyset pagination on (created_at, id), newest first: stable under inserts
        try:
            created_text, last_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
            created = dt.datetime.fromisoformat(created_text)  # a cursor we did not write fails here
            query = query.where((Job.created_at < created) | ((Job.created_at == created) & (Job.id < last_id)))
        except ValueError as exc:
            raise ConfigError("malformed cursor") from exc
    rows = session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    token = None
    if more:
        token = base64.urlsafe_b64encode(f"{rows[-1].created_at.isoformat(sep=' ')}|{rows[-1].id}".encode()).decode()
    return JobList(items=[job_out(j) for j in rows], next_cursor=token)


@router.get("/{job_id}", response_model=JobOut)
async def get_job(
    job_id: str, ctx: Ctx, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)] = None
) -> Response:
    # The hot path (clients poll it): authentication and both queries in one thread-pool hop and one
    # short connection checkout, instead of a hop per dependency (BEARER is async: no hop).
    authorization = f"Bearer {credentials.credentials}" if credentials is not None else None

    def read() -> Response:
        with ctx.sessions() as session:
            job = load_job(session, ctx.keys.tenant(session, authorization), job_id)
            layers = session.scalars(
                select(JobLayer).where(JobLayer.job_id == job_id).order_by(JobLayer.position)
            ).all()
            # serialised once here; returning the model would have FastAPI validate it again
            return Response(job_out(job, list(layers)).model_dump_json(), media_type="application/json")

    return await run_in_threadpool(read)


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel(job_id: str, tenant: Tenant, session: DbSession) -> JobOut:
    job = load_job(session, tenant, job_id)
    if job.status in machine.TERMINAL:
        raise ConflictError(f"job {job_id} has already {job.status}")
    machine.request_cancel(session, job_id)
    return job_out(load_job(session, tenant, job_id))


@router.delete("/{job_id}", status_code=204)
def delete_job(job_id: str, tenant: Tenant, ctx: Ctx, session: DbSession) -> Response:
    job = load_job(session, tenant, job_id)
    if job.status not in machine.TERMINAL:
        raise ConflictError(f"job {job_id} is {job.status}; cancel it and wait for it to stop first")
    # events, layers, artifact and metrics rows go with it: every child table is ON DELETE CASCADE
    session.execute(delete(Job).where(Job.id == job_id))
    session.commit()
    ctx.store.remove(job_id)
    return Response(status_code=204)


def _event_id(header: str | None) -> int:
    """The event id a client resumes after; anything but a plain ASCII number an event id can
    have (a signed 64-bit integer) is ignored: the stream starts from the beginning."""
    if header and re.fullmatch(r"[0-9]{1,18}", header.strip()):
        return int(header.strip())
    return 0


@router.get(
    "/{job_id}/events", response_class=EventSourceResponse, responses={200: {"content": {"text/event-stream": {}}}}
)
def events(
    job_id: str,
    tenant: Tenant,
    ctx: Ctx,
    session: DbSession,
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventSourceResponse:
    """Server-sent events: every status and progress event, then the stream ends with the job.

    Each event has the job event's id (resume with ``Last-Event-ID``), its kind ("status" or
    "progress") as the event name and its data as JSON with an ``at`` timestamp.
    """
    load_job(session, tenant, job_id)
    start = _event_id(last_event_id)

    def fetch(after: int) -> tuple[list[JobEvent], str]:
        with ctx.sessions() as session:
            rows = session.scalars(
                select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id).limit(500)
            ).all()
            status = session.scalar(select(Job.status).where(Job.id == job_id)) or machine.CANCELLED
            return list(rows), status

    async def stream() -> AsyncIterator[ServerSentEvent]:
        after = start
        while True:  # sse-starlette cancels this generator when the client disconnects
            rows, status = await asyncio.to_thread(fetch, after)
            for row in rows:
                after = row.id
                payload = json.dumps({**row.data, "at": row.created_at.isoformat() + "Z"})
                yield ServerSentEvent(payload, event=row.kind, id=str(row.id))
            if not rows and status in machine.TERMINAL:
                return
            await asyncio.sleep(ctx.settings.sse_poll_seconds)

    # ping: a comment line every 15 s keeps proxies from closing a quiet stream.
    return EventSourceResponse(stream(), ping=15, sep="\n", headers={"Cache-Control": "no-cache"})
