"""Celery tasks: thin shells over ``worker.runner``."""

from __future__ import annotations

import logging
from functools import lru_cache

from celery.exceptions import SoftTimeLimitExceeded

from service.queue import EVALUATE_TASK, QUANTIZE_TASK, enqueue
from worker.celery_app import app, settings
from worker.runner import WorkerContext, claim_job, fail_job, run_job

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _context() -> WorkerContext:
    return WorkerContext.from_settings(settings)


@app.task(name=QUANTIZE_TASK, acks_late=True, reject_on_worker_lost=True)
def quantize_job(job_id: str) -> str:
    return _step(job_id, "quantize")


@app.task(name=EVALUATE_TASK, acks_late=True, reject_on_worker_lost=True)
def evaluate_job(job_id: str) -> str:
    return _step(job_id, "evaluate")


def _step(delivered: str, step: str) -> str:
    ctx = _context()
    job_id = claim_job(ctx, delivered, step)  # a quantize delivery runs whichever tenant's turn it is
    if job_id is None:
        return "skipped"
    try:
        status = run_job(ctx, job_id, step)
    except SoftTimeLimitExceeded:
        fail_job(ctx, job_id, f"exceeded the soft time limit of {settings.task_soft_limit_s:.0f} s")
        return "failed"
    except Exception as exc:
        log.exception("job %s crashed", job_id)
        fail_job(ctx, job_id, f"internal error: {type(exc).__name__}: {exc}")
        return "failed"
    if status == "released":  # another, larger worker should take it
        enqueue(app, QUANTIZE_TASK, job_id)
    elif status == "evaluate":  # quantized and published: evaluation is the next task
        enqueue(app, EVALUATE_TASK, job_id)
    return status
