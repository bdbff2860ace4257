"""Fair sharing of the workers between tenants.

The broker holds one message per queued job, but a message is a *turn*, not a promise to run that
job: a worker that receives a turn claims whichever queued job is fairest (``fair_queue``). One
tenant's flood of jobs then cannot starve another's: the tenant with the fewest running jobs, and
among those the one served least recently, goes next; a tenant's own jobs run in submission
order. Turns and jobs stay balanced: a turn that ran another job leaves its own job queued, and
that job's message is still in the broker, so it becomes the spare turn. A message whose own job
is not queued (a duplicate delivery, a cancelled job) is a spare turn as well; with nothing queued
it is dropped.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from service import jobs as machine
from service.db import Job

log = logging.getLogger(__name__)


def fair_queue(session: Session) -> list[str]:
    """The queued jobs' ids in the order a free worker should take them: round robin over the
    tenants (each tenant's oldest job first), tenants ordered by (running jobs, latest start)."""
    queued = session.execute(
        select(Job.id, Job.tenant).where(Job.status == machine.QUEUED).order_by(Job.created_at, Job.id)
    ).all()
    if not queued:
        return []
    per_tenant: dict[str, list[str]] = defaultdict(list)
    for job_id, tenant in queued:
        per_tenant[tenant].append(job_id)
    usage = {
        tenant: (int(running or 0), last)
        for tenant, running, last in session.execute(
            select(
                Job.tenant,
                func.sum(case((Job.status == machine.RUNNING, 1), else_=0)),
                func.max(Job.started_at),
            )
            .where(Job.tenant.in_(list(per_tenant)))
            .group_by(Job.tenant)
        ).all()
    }

    def rank(tenant: str) -> tuple[int, bool, dt.datetime, str]:
        running, last = usage.get(tenant, (0, None))
        # never served sorts first; then the least recently started; the name breaks exact ties
        return running, last is not None, last or dt.datetime.min, tenant

    tenants = sorted(per_tenant, key=rank)
    depth = max(len(ids) for ids in per_tenant.values())
    return [per_tenant[t][i] for i in range(depth) for t in tenants if i < len(per_tenant[t])]


def claim_turn(session: Session, delivered: str, worker: str, lease_seconds: float) -> str | None:
    """Claim a job for one delivery of the quantize step; the claimed job's id, or None.

    A delivered job that is running but abandoned (its lease expired) is resumed: it has a worker's
    checkpoints and an attempt under way. Otherwise the delivery is a turn for the fairest queued
    job; when a race with another worker loses that one, the next in the fair order is tried.
    """
    job = session.get(Job, delivered)
    if job is not None and job.status == machine.RUNNING and machine.claim(session, delivered, worker, lease_seconds):
        return delivered
    for candidate in fair_queue(session):
        if machine.claim(session, candidate, worker, lease_seconds):
            if candidate != delivered:
                log.info("delivery of job %s runs job %s, whose tenant's turn it is", delivered, candidate)
            return candidate
    return None
