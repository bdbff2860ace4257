"""The lease reaper: jobs whose worker vanished go back to the queue, whatever the broker did.

Runs in every worker (a thread of the worker's main process). A running job whose lease expired
(its worker was killed, lost power, or hangs) is moved back to queued by one conditional UPDATE,
so of many reapers exactly one re-sends it; the next worker resumes it from its checkpoints. A
queued job whose message may have been lost (a broker restart without persistence) is re-sent
after ``requeue_after_seconds``; a duplicate message is harmless, since only one claim can win.
A job handed from quantization to evaluation holds no worker while its evaluation task waits for
one (behind other jobs' quantizations, on a busy fleet); that wait is not a dead worker: only its
evaluation message is re-sent after ``requeue_after_seconds``, its published artifact is kept.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import and_, select, update
from sqlalchemy.orm import Session, sessionmaker

from service import jobs as machine
from service.db import Job, Worker, utcnow

log = logging.getLogger(__name__)


def reap_once(
    sessions: sessionmaker[Session],
    send: Callable[[str, str], None],
    requeue_after_seconds: float,
    lease_seconds: float = 30.0,
) -> list[str]:
    """One sweep; ``send(job_id, step)`` sends a "quantize" or "evaluate" task. Returns the ids of
    the jobs it (re-)sent."""
    now = utcnow()
    sent: list[tuple[str, str]] = []
    with sessions() as session:
        held = and_(Job.status == machine.RUNNING, Job.worker.is_not(None), Job.lease_until < now)
        for job_id in session.scalars(select(Job.id).where(held)).all():
            if machine.requeue_stale(session, job_id):
                log.warning("job %s: its worker's lease expired; re-queued", job_id)
                sent.append((job_id, "quantize"))
        waited = now - dt.timedelta(seconds=requeue_after_seconds)
        lost = session.scalars(select(Job.id).where(Job.status == machine.QUEUED, Job.enqueued_at < waited)).all()
        for job_id in lost:
            statement = update(Job).where(Job.id == job_id, Job.status == machine.QUEUED, Job.enqueued_at < waited)
            moved = machine.updated_rows(session, statement.values(enqueued_at=now))
            session.commit()
            if moved:
                sent.append((job_id, "quantize"))
        # handed off: the lease the hand-off set dates its evaluation message
        handed = and_(Job.status == machine.RUNNING, Job.worker.is_(None), Job.lease_until < waited)
        for job_id in session.scalars(select(Job.id).where(handed)).all():
            statement = update(Job).where(Job.id == job_id, handed)
            later = now + dt.timedelta(seconds=lease_seconds)
            moved = machine.updated_rows(session, statement.values(lease_until=later))
            session.commit()
            if moved:
                log.info("job %s: evaluation still waiting for a worker; its message re-sent", job_id)
                sent.append((job_id, "evaluate"))
    for job_id, step in sent:
        send(job_id, step)
    return [job_id for job_id, _ in sent]


@dataclass(frozen=True)
class Capacity:
    """What a worker can hold: host memory, and its compute device with that device's memory."""

    memory_bytes: float
    device: str = "cpu"
    device_memory_bytes: float | None = None


def register(sessions: sessionmaker[Session], name: str, capacity: Capacity) -> None:
    """Advertise this worker, its memory and device (the pre-flight check compares jobs with them)."""
    with sessions() as session:
        session.merge(
            Worker(
                name=name,
                memory_bytes=capacity.memory_bytes,
                device=capacity.device,
                device_memory_bytes=capacity.device_memory_bytes,
                last_seen=utcnow(),
            )
        )
        session.commit()


class Reaper(threading.Thread):
    def __init__(
        self,
        sessions: sessionmaker[Session],
        send: Callable[[str, str], None],
        *,
        name: str,
        capacity: Capacity,
        interval: float,
        requeue_after_seconds: float,
        lease_seconds: float,
    ) -> None:
        super().__init__(name="rsavq-reaper", daemon=True)
        self.sessions, self.send, self.worker, self.capacity = sessions, send, name, capacity
        self.interval, self.requeue_after, self.lease = interval, requeue_after_seconds, lease_seconds
        self.stopped = threading.Event()

    def run(self) -> None:
        while True:
            try:
                register(self.sessions, self.worker, self.capacity)
                reap_once(self.sessions, self.send, self.requeue_after, self.lease)
            except Exception as exc:  # database or broker blip: the next sweep retries
                log.warning("reaper sweep failed: %s", exc)
            if self.stopped.wait(self.interval):
                return
