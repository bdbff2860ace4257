"""A job's side channel to the database while it runs: progress with ETA, per-layer reports,
cancel requests and the lease heartbeat."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from rsavq_core.errors import JobCancelled
from service import jobs as machine

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Another worker took the job over (this one was presumed dead); stop without touching it."""


class Heartbeat:
    """Renews the job's lease every lease/3 seconds from a thread, independent of layer duration,
    and notes a cancel request as it goes (the quantization's inner loops look at ``cancelled``)."""

    def __init__(self, sessions: sessionmaker[Session], job_id: str, worker: str, lease_seconds: float) -> None:
        self.sessions, self.job_id, self.worker, self.lease = sessions, job_id, worker, lease_seconds
        self.lost = threading.Event()
        self.cancelled = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id[:8]}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.lease / 3):
            try:
                with self.sessions() as session:
                    if not machine.renew_lease(session, self.job_id, self.worker, self.lease):
                        self.lost.set()  # taken over, or the job is gone (cancelled and deleted)
                        return
                    if machine.cancel_requested(session, self.job_id):
                        self.cancelled.set()
            except Exception as exc:  # a database blip: keep trying; the lease outlives a few misses
                log.warning("lease renewal of job %s failed: %s", self.job_id, exc)


class Reporter:
    """Progress callbacks for ``quantize_model`` and evaluation; raises JobCancelled or LeaseLost."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        job_id: str,
        worker: str,
        lease_seconds: float,
        heartbeat: Heartbeat,
        min_interval: float = 0.5,
    ) -> None:
        self.sessions, self.job_id, self.worker, self.lease = sessions, job_id, worker, lease_seconds
        self.heartbeat, self.min_interval = heartbeat, min_interval
        self.stage, self.stage_started, self.last_write = "", 0.0, 0.0
        self.layers_seen, self.first_done = 0, 0

    def __call__(self, stage: str, done: int, total: int, detail: Mapping[str, float] | None = None) -> None:
        if self.heartbeat.lost.is_set():
            raise LeaseLost(f"job {self.job_id} was taken over by another worker")
        now = time.monotonic()
        if stage != self.stage:
            self.stage, self.stage_started, self.first_done = stage, now, done
        finished = done >= total
        if not finished and now - self.last_write < self.min_interval:
            return  # rate-limit writes: statistics report every micro-batch
        self.last_write = now
        eta = None
        rate_done = done - self.first_done
        if 0 < rate_done and done < total:
            eta = (now - self.stage_started) / rate_done * (total - done)
        percent = 100.0 * done / total if total else 0.0
        with self.sessions() as session:
            cancel = machine.report_progress(
                session, self.job_id, self.worker, stage, done, total, percent, eta, self.lease, detail
            )
        if cancel:
            raise JobCancelled(f"job {self.job_id} was cancelled")

    def check(self) -> None:
        """The stop check of the quantization's inner loops (``rsavq_core.progress.stop_check``):
        no database access, only what the heartbeat saw."""
        if self.heartbeat.lost.is_set():
            raise LeaseLost(f"job {self.job_id} was taken over by another worker")
        if self.heartbeat.cancelled.is_set():
            raise JobCancelled(f"job {self.job_id} was cancelled")

    def layer(self, name: str, report: dict[str, Any]) -> None:
        summary = {k: report[k] for k in ("bits", "proxy_error", "hessian_error", "seconds") if k in report}
        with self.sessions() as session:
            machine.record_layer(session, self.job_id, name, self.layers_seen, _plain(summary))
        self.layers_seen += 1


def _plain(value: Any) -> Any:
    """JSON-safe copy (numpy/torch scalars -> float)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    return float(value)
