"""The Celery application, as both the API (which only sends) and the workers configure it.

Nothing here imports torch: the API sends tasks by name. Reliability settings, and why:
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only when its task
  has finished, so a worker that dies mid-job leaves the message to be redelivered;
- ``worker_prefetch_multiplier = 1``: a GPU worker holds one job, not a queue of them;
- time limits: the soft limit raises inside the task (the job fails with a message saying so),
  the hard limit kills the worker child;
- the job's state lives in the database; the lease reaper (``worker.reaper``) re-sends jobs whose
  worker vanished, whatever the broker did with their messages (kombu's SQLite transport, used by
  the embedded default, does not redeliver a message of a killed consumer).
"""

from __future__ import annotations

from celery import Celery

from service.errors import UnavailableError
from service.settings import Settings

QUEUE = "gpu"
QUANTIZE_TASK = "worker.tasks.quantize_job"
EVALUATE_TASK = "worker.tasks.evaluate_job"


def make_celery(settings: Settings) -> Celery:
    app = Celery("rsavq", broker=settings.broker_url)
    app.conf.update(
        task_default_queue=QUEUE,
        task_routes={"worker.tasks.*": {"queue": QUEUE}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_soft_time_limit=settings.task_soft_limit_s,
        task_time_limit=settings.task_hard_limit_s,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
    )
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # An unacknowledged message is redelivered after this long (default: an hour). A duplicate
        # delivery of a job whose lease is live is dropped by the claim, so this can be short.
        app.conf.broker_transport_options = {"visibility_timeout": max(300.0, 10 * settings.lease_seconds)}
    return app


def enqueue(app: Celery, task: str, job_id: str) -> None:
    """Send one job's task; UnavailableError when the broker cannot be reached."""
    try:
        app.send_task(
            task,
            args=[job_id],
            queue=QUEUE,
            retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
        )
    except Exception as exc:  # kombu raises transport-specific errors; all mean "broker unreachable"
        raise UnavailableError(f"the message broker is unreachable: {exc}") from exc


def broker_ok(app: Celery) -> bool:
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:  # any transport error means "not healthy"; /health reports it
        return False
