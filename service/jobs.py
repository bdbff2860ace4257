"""The job state machine. Every status change is one conditional UPDATE, so two workers (or a worker
and a cancel request) can never both move the same job: the loser's UPDATE matches no row.

    queued ──claim──> running ──> succeeded | failed | cancelled
       │                 ├──(lease expired: reaper)──> queued
       │                 └──hand_off──> running, no worker ──claim (next step's task)──> running
       └──> cancelled | failed

A hand-off passes a running job from one step's task to the next (quantization -> evaluation), so
the next step may run on another worker; if its message is lost, the lease expires and the reaper
re-queues the job like any other.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any, cast

from sqlalchemy import CursorResult, Update, and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from service.db import Job, JobEvent, JobLayer, utcnow

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
ACTIVE = (QUEUED, RUNNING)  # a job that still needs a worker
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)


def add_event(session: Session, job_id: str, kind: str, data: dict[str, Any]) -> None:
    session.add(JobEvent(job_id=job_id, kind=kind, data=data, created_at=utcnow()))


def updated_rows(session: Session, statement: Update) -> int:
    """How many rows an UPDATE changed (an UPDATE's result is a cursor result)."""
    return cast(CursorResult[Any], session.execute(statement)).rowcount


def _move(session: Session, job_id: str, where: Any, values: dict[str, Any], event: dict[str, Any]) -> bool:
    """UPDATE jobs SET values WHERE id = job_id AND where; record the event if a row moved. Commits."""
    values = {**values, "updated_at": utcnow()}
    moved = updated_rows(session, update(Job).where(Job.id == job_id, where).values(**values)) == 1
    if moved:
        add_event(session, job_id, "status", event)
    session.commit()
    return moved


def claim(session: Session, job_id: str, worker: str, lease_seconds: float) -> bool:
    """queued -> running for ``worker``; also takes a handed-off job, or one whose lease expired."""
    now = utcnow()
    lease = now + dt.timedelta(seconds=lease_seconds)
    handed_off = and_(Job.status == RUNNING, Job.worker.is_(None))
    free = or_(Job.status == QUEUED, handed_off, and_(Job.status == RUNNING, Job.lease_until < now))
    # a hand-off is the next step of the same attempt, not a new delivery
    attempts = case((handed_off, Job.attempts), else_=Job.attempts + 1)
    return _move(
        session,
        job_id,
        free,
        {
            "status": RUNNING,
            "worker": worker,
            "lease_until": lease,
            "attempts": attempts,
            "started_at": func.coalesce(Job.started_at, now),
            "error": None,
        },
        {"status": RUNNING, "worker": worker},
    )


def hand_off(session: Session, job_id: str, worker: str, stage: str, lease_seconds: float) -> bool:
    """The holder lets go of a running job so that the next step's task can claim it."""
    lease = utcnow() + dt.timedelta(seconds=lease_seconds)
    statement = (
        update(Job)
        .where(Job.id == job_id, Job.worker == worker, Job.status == RUNNING)
        .values(worker=None, stage=stage, lease_until=lease, eta_seconds=None, updated_at=utcnow())
    )
    moved = updated_rows(session, statement) == 1
    if moved:
        add_event(
            session, job_id, "progress", {"stage": stage, "done": 0, "total": 0, "percent": 0.0, "eta_seconds": None}
        )
    session.commit()
    return moved


def renew_lease(session: Session, job_id: str, worker: str, lease_seconds: float) -> bool:
    """Extend the lease; False when the job is no longer this worker's (taken over, cancelled)."""
    lease = utcnow() + dt.timedelta(seconds=lease_seconds)
    statement = update(Job).where(Job.id == job_id, Job.worker == worker, Job.status == RUNNING)
    renewed = updated_rows(session, statement.values(lease_until=lease))
    session.commit()
    return renewed == 1


def cancel_requested(session: Session, job_id: str) -> bool:
    """Has a cancel been asked for this (running) job?"""
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def finish(session: Session, job_id: str, worker: str, status: str, *, error: str | None = None, **values: Any) -> bool:
    """running -> succeeded | failed | cancelled, only by the worker that holds the job."""
    assert status in TERMINAL, status
    now = utcnow()
    changes = {
        "status": status,
        "error": error,
        "finished_at": now,
        "lease_until": None,
        "stage": status,
        "eta_seconds": None,
        "progress_detail": None,
        **values,
    }
    if status == SUCCEEDED:
        changes["percent"] = 100.0
    event = {"status": status, **({"error": error} if error else {})}
    return _move(session, job_id, and_(Job.status == RUNNING, Job.worker == worker), changes, event)


def fail_unclaimed(session: Session, job_id: str, error: str) -> bool:
    """queued -> failed (a job that can never run: pre-flight, too many attempts)."""
    return _move(
        session,
        job_id,
        Job.status.in_(ACTIVE),
        {"status": FAILED, "error": error, "finished_at": utcnow(), "lease_until": None, "stage": FAILED},
        {"status": FAILED, "error": error},
    )


def request_cancel(session: Session, job_id: str) -> str:
    """Cancel a queued job at once; ask a running one to stop at its next layer. Returns the status."""
    if _move(
        session,
        job_id,
        Job.status == QUEUED,
        {"status": CANCELLED, "finished_at": utcnow(), "stage": CANCELLED},
        {"status": CANCELLED},
    ):
        return CANCELLED
    session.execute(update(Job).where(Job.id == job_id, Job.status == RUNNING).values(cancel_requested=True))
    session.commit()
    job = session.get(Job, job_id, populate_existing=True)
    return job.status if job else CANCELLED


def release(session: Session, job_id: str, worker: str) -> bool:
    """running -> queued by the holding worker (it cannot run the job itself, another may)."""
    return _move(
        session,
        job_id,
        and_(Job.status == RUNNING, Job.worker == worker),
        {"status": QUEUED, "worker": None, "lease_until": None, "enqueued_at": utcnow()},
        {"status": QUEUED, "reason": "released by " + worker},
    )


def requeue_stale(session: Session, job_id: str) -> bool:
    """running (lease expired: its worker died) -> queued. The caller then re-sends the task."""
    now = utcnow()
    return _move(
        session,
        job_id,
        and_(Job.status == RUNNING, Job.lease_until < now),
        {"status": QUEUED, "worker": None, "lease_until": None, "enqueued_at": now},
        {"status": QUEUED, "reason": "worker lost; resuming from the last finished layer"},
    )


def report_progress(
    session: Session,
    job_id: str,
    worker: str,
    stage: str,
    done: int,
    total: int,
    percent: float,
    eta_seconds: float | None,
    lease_seconds: float,
    detail: Mapping[str, float] | None = None,
) -> bool:
    """Record progress (and renew the lease). Returns True when the job was asked to cancel."""
    data: dict[str, Any] = {
        "stage": stage,
        "done": done,
        "total": total,
        "percent": round(percent, 2),
        "eta_seconds": None if eta_seconds is None else round(eta_seconds, 1),
    }
    if detail:
        data["detail"] = {k: float(v) for k, v in detail.items()}
    lease = utcnow() + dt.timedelta(seconds=lease_seconds)
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker == worker, Job.status == RUNNING)
        .values(
            stage=stage,
            done=done,
            total=total,
            percent=percent,
            eta_seconds=eta_seconds,
            progress_detail=data.get("detail"),
            lease_until=lease,
            updated_at=utcnow(),
        )
    )
    add_event(session, job_id, "progress", data)
    session.commit()
    return cancel_requested(session, job_id)


def record_layer(session: Session, job_id: str, name: str, position: int, report: dict[str, Any]) -> None:
    """Upsert one finished layer's report (a resumed job reports its checkpointed layers again)."""
    existing = session.get(JobLayer, (job_id, name))
    if existing is None:
        session.add(JobLayer(job_id=job_id, name=name, position=position, report=report))
    else:
        existing.report = report
    session.commit()
