"""/v1/sweeps: one request with several bit budgets, one job per budget, reported side by side.

The jobs are ordinary jobs (``/v1/jobs/{id}`` shows each; cancel or delete them there, or delete
the finished sweep with all of its jobs). A retried submission with the same ``Idempotency-Key``
returns the same sweep. The jobs share the calibration statistics: a worker computes them for the
first job it runs and the statistics cache serves the same model and calibration windows to the
others (on a fleet, each worker host computes them once).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Response
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service import jobs as machine
from service.api.deps import Context, DbSession, get_context, tenant_of
from service.api.routes.datasets import check_job_datasets
from service.api.schemas.jobs import SweepList, SweepOut, SweepRequest, SweepRow
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
from service.db import Artifact, Job, JobMetrics, Sweep
from service.errors import ConflictError, NotFoundError

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"])
Tenant = Annotated[str, Depends(tenant_of)]
Ctx = Annotated[Context, Depends(get_context)]
LIST_LIMIT = 50


def _metric(data: dict[str, Any], *path: str) -> float | None:
    value: Any = data
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, int | float) else None


def _status(statuses: list[str]) -> str:
    if any(s in machine.ACTIVE for s in statuses):
        return machine.RUNNING if any(s != machine.QUEUED for s in statuses) else machine.QUEUED
    if statuses and all(s == machine.SUCCEEDED for s in statuses):
        return machine.SUCCEEDED
    return machine.FAILED if statuses and all(s == machine.FAILED for s in statuses) else "mixed"


def sweep_out(session: Session, sweep: Sweep) -> SweepOut:
    jobs = {job.bits: job for job in session.scalars(select(Job).where(Job.sweep_id == sweep.id))}
    ids = [job.id for job in jobs.values()]
    metrics = {m.job_id: m.data for m in session.scalars(select(JobMetrics).where(JobMetrics.job_id.in_(ids)))}
    sizes = {a.job_id: a.size for a in session.scalars(select(Artifact).where(Artifact.job_id.in_(ids)))}
    rows = []
    for bits in sweep.bits:
        job = jobs.get(float(bits))
        if job is None:  # deleted by its owner
            rows.append(SweepRow(bits=bits, status="deleted"))
            continue
        data = metrics.get(job.id, {})
        rows.append(
            SweepRow(
                bits=bits,
                job_id=job.id,
                status=job.status,
                effective_bpw=job.effective_bpw,
                artifact_bytes=sizes.get(job.id),
                perplexity=_metric(data, "quantized", "perplexity", "ppl"),
                zero_shot=_metric(data, "quantized", "zero_shot", "average"),
            )
        )
    base = f"/v1/sweeps/{sweep.id}"
    return SweepOut(
        id=sweep.id,
        name=sweep.name,
        model_id=sweep.model_id,
        method=sweep.method,
        status=_status([r.status for r in rows if r.status != "deleted"]),
        created_at=sweep.created_at,
        rows=rows,
        links={"self": base, **{f"job {r.bits:g}": f"/v1/jobs/{r.job_id}" for r in rows if r.job_id}},
    )


@router.post("", status_code=202, response_model=SweepOut, summary="Quantize one model at several bit budgets")
def submit_sweep(
    body: SweepRequest,
    response: Response,
    tenant: Tenant,
    ctx: Ctx,
    session: DbSession,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> SweepOut:
    check_model_id(body.model_id, ctx.settings.allow_local_models)
    requests = body.jobs()
    for request in requests:
        request.quant_config()  # every budget's rules, before anything is stored
    check_job_datasets(session, tenant, ArtifactStore(ctx.settings.artifact_dir), requests[0])
    request_hash = request_digest(body)
    existing = by_idempotency_key(session, Sweep, tenant, idempotency_key, request_hash)
    if existing is not None:
        response.headers["Location"] = f"/v1/sweeps/{existing.id}"
        return sweep_out(session, existing)
    within_tenant_limit(session, tenant, ctx.settings.tenant_max_active_jobs, adding=len(requests))
    sweep = Sweep(
        id=uuid.uuid4().hex,
        tenant=tenant,
        model_id=body.model_id,
        method=body.method,
        name=body.name,
        bits=body.bits,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    session.add(sweep)
    winner = insert_or_retried(session, sweep, tenant, idempotency_key, request_hash)
    if winner is not sweep:  # a concurrent retry with the same key won the insert
        response.headers["Location"] = f"/v1/sweeps/{winner.id}"
        return sweep_out(session, winner)
    jobs = [new_job(session, tenant, request, request_digest(request), sweep_id=sweep.id) for request in requests]
    session.flush()
    for job in jobs:
        machine.add_event(session, job.id, "status", {"status": machine.QUEUED})
    session.commit()
    enqueue_or_forget(ctx, session, [job.id for job in jobs], forget=delete(Sweep).where(Sweep.id == sweep.id))
    for request in requests:
        ctx.metrics.jobs_submitted.labels(method=request.method).inc()
    response.headers["Location"] = f"/v1/sweeps/{sweep.id}"
    return sweep_out(session, sweep)


def load_sweep(session: Session, tenant: str, sweep_id: str) -> Sweep:
    """The tenant's sweep; another tenant's is indistinguishable from a missing one (404)."""
    sweep = session.get(Sweep, sweep_id)
    if sweep is None or sweep.tenant != tenant:
        raise NotFoundError(f"no sweep {sweep_id!r}")
    return sweep


@router.get("/{sweep_id}", response_model=SweepOut, summary="A sweep's jobs side by side")
def get_sweep(sweep_id: str, tenant: Tenant, session: DbSession) -> SweepOut:
    return sweep_out(session, load_sweep(session, tenant, sweep_id))


@router.delete(
    "/{sweep_id}",
    status_code=204,
    summary="Delete a sweep with its jobs and artifacts (409 while any of them is queued or running)",
)
def delete_sweep(sweep_id: str, tenant: Tenant, ctx: Ctx, session: DbSession) -> Response:
    sweep = load_sweep(session, tenant, sweep_id)
    jobs = session.execute(select(Job.id, Job.status).where(Job.sweep_id == sweep.id)).all()
    active = [job_id for job_id, status in jobs if status not in machine.TERMINAL]
    if active:
        raise ConflictError(
            f"sweep {sweep_id} has {len(active)} job(s) queued or running ({', '.join(active)}); "
            "cancel them and wait for them to stop first"
        )
    # each job's events, layers, artifact and metrics rows go with it (ON DELETE CASCADE)
    session.execute(delete(Job).where(Job.id.in_([job_id for job_id, _ in jobs])))
    session.delete(sweep)
    session.commit()
    for job_id, _ in jobs:
        ctx.store.remove(job_id)
    return Response(status_code=204)


@router.get("", response_model=SweepList, summary=f"This key's sweeps, newest first (at most {LIST_LIMIT})")
def list_sweeps(tenant: Tenant, session: DbSession) -> SweepList:
    rows = session.scalars(
        select(Sweep).where(Sweep.tenant == tenant).order_by(Sweep.created_at.desc()).limit(LIST_LIMIT)
    ).all()
    return SweepList(items=[sweep_out(session, sweep) for sweep in rows])
