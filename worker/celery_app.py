"""The Celery worker: ``celery -A worker.celery_app worker -Q gpu`` (or ``rsavq worker``).

torch is imported by the tasks, lazily, in the worker child; the main process only runs Celery's
consumer and the lease reaper.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from service.db import session_factory
from service.queue import EVALUATE_TASK, QUANTIZE_TASK, enqueue, make_celery
from service.settings import get_settings

log = logging.getLogger(__name__)
settings = get_settings()
app = make_celery(settings)
app.conf.include = ["worker.tasks"]
_reaper: Any = None


@worker_ready.connect
def _start_reaper(**_kwargs: Any) -> None:
    global _reaper
    from worker.reaper import Reaper
    from worker.runner import worker_capacity, worker_name

    _reaper = Reaper(
        session_factory(settings.database_url),
        lambda job_id, step: enqueue(app, EVALUATE_TASK if step == "evaluate" else QUANTIZE_TASK, job_id),
        name=worker_name(),
        capacity=worker_capacity(settings),
        interval=max(1.0, settings.lease_seconds / 2),
        requeue_after_seconds=settings.requeue_after_s,
        lease_seconds=settings.lease_seconds,
    )
    _reaper.start()
    log.info("reaper started (every %.1f s)", _reaper.interval)


@worker_shutdown.connect
def _stop_reaper(**_kwargs: Any) -> None:
    if _reaper is not None:
        _reaper.stopped.set()
