"""One job, start to finish, as plain functions (the Celery task in ``worker.tasks`` is a shell).

Stages: resolve the model (fails fast) -> pre-flight memory check -> quantize (statistics cached,
every layer checkpointed) -> publish the artifact -> evaluate. A redelivered job repeats only
what is missing: finished layers come from their checkpoints, a published artifact is not rebuilt.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from rsavq_core.config.quant_config import QuantConfig, config_from_job
from rsavq_core.data.text_files import TextSource
from rsavq_core.errors import ConfigError, JobCancelled, RSAVQError
from rsavq_core.progress import stop_check
from service import jobs as machine
from service.artifacts import ArtifactStore
from service.datasets import job_dataset_ids, read_dataset
from service.db import Artifact, Dataset, Job, JobMetrics, Worker, utcnow
from service.scheduling import claim_turn
from service.settings import Settings
from worker.reaper import Capacity

if TYPE_CHECKING:
    from rsavq_core.models.memory import MemoryEstimate
from worker.reporter import Heartbeat, LeaseLost, Reporter

log = logging.getLogger(__name__)


class WrongWorker(Exception):
    """This worker cannot hold the job but a larger live one can: release it for that one."""


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class WorkerContext:
    settings: Settings
    sessions: sessionmaker[Session]
    store: ArtifactStore
    name: str

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerContext:
        from service.db import session_factory

        settings.ensure_dirs()
        return cls(
            settings, session_factory(settings.database_url), ArtifactStore(settings.artifact_dir), worker_name()
        )


def calibration_text(ctx: WorkerContext, job: Job) -> TextSource | None:
    """The job's own calibration text (``options.calibration.dataset``), or None for the bundled one."""
    dataset_id, _ = job_dataset_ids(job.options or {})
    return _job_dataset(ctx, job, dataset_id) if dataset_id else None


def evaluation_texts(ctx: WorkerContext, job: Job) -> list[TextSource]:
    """The job's own evaluation texts (``options.evaluation.datasets``), in the order named."""
    _, ids = job_dataset_ids(job.options or {})
    return [_job_dataset(ctx, job, dataset_id) for dataset_id in ids]


def _job_dataset(ctx: WorkerContext, job: Job, dataset_id: str) -> TextSource:
    """A dataset of the job's tenant, read from the store and checked against its recorded sha256
    (a deleted or changed dataset fails the job saying so)."""
    with ctx.sessions() as session:
        row = session.get(Dataset, dataset_id)
    if row is None or row.tenant != job.tenant:
        raise ConfigError(f"dataset {dataset_id} no longer exists")
    return read_dataset(ctx.store, row)


def job_config(job: Job) -> QuantConfig:
    return config_from_job(job.method, job.bits, job.options)


def claim_job(ctx: WorkerContext, delivered: str, step: str = "quantize") -> str | None:
    """Claim a job for one delivery: the id of the job this worker now holds, or None.

    The quantize step's delivery is a turn for the fairest queued job (``service.scheduling``), which
    need not be the delivered one; the evaluation step continues the delivered job itself.
    """
    with ctx.sessions() as session:
        if step == "quantize":
            claimed = claim_turn(session, delivered, ctx.name, ctx.settings.lease_seconds)
        else:
            claimed = delivered if machine.claim(session, delivered, ctx.name, ctx.settings.lease_seconds) else None
        if claimed is None:
            job = session.get(Job, delivered)
            log.info("job %s not claimable (%s); dropping this delivery", delivered, job.status if job else "deleted")
    return claimed


def run_job(ctx: WorkerContext, job_id: str, step: str = "quantize") -> str:
    """Run one step of a job this worker has claimed (``claim_job``): "quantize", then "evaluate".

    Returns the job's final status; "evaluate" when the quantization step handed the job to the
    evaluation step (the caller sends that task); "skipped" when another worker took the job over;
    "released" when a larger worker should take it.
    """
    with ctx.sessions() as session:
        job = session.get(Job, job_id, populate_existing=True)
        assert job is not None
        if job.attempts > ctx.settings.max_attempts:
            error = f"gave up after {job.attempts - 1} attempts (each attempt's worker died)"
            machine.finish(session, job_id, ctx.name, machine.FAILED, error=error)
            return machine.FAILED
    with Heartbeat(ctx.sessions, job_id, ctx.name, ctx.settings.lease_seconds) as heartbeat:
        reporter = Reporter(ctx.sessions, job_id, ctx.name, ctx.settings.lease_seconds, heartbeat)
        try:
            with stop_check(reporter.check):
                outcome = _run_stages(ctx, job, reporter, step)
        except WrongWorker as exc:
            log.info("job %s: %s; releasing it for a larger worker", job_id, exc)
            with ctx.sessions() as session:
                machine.release(session, job_id, ctx.name)
            return "released"
        except LeaseLost:
            log.warning("job %s: lease lost to another worker; stopping", job_id)
            return "skipped"
        except JobCancelled:
            return _end(ctx, job_id, machine.CANCELLED, None, cleanup=True)
        except RSAVQError as exc:
            return _end(ctx, job_id, machine.FAILED, f"{type(exc).__name__}: {exc}", cleanup=False)
        except MemoryError:
            return _end(ctx, job_id, machine.FAILED, "out of memory in the worker", cleanup=False)
    if outcome == "evaluate":
        with ctx.sessions() as session:
            if machine.hand_off(session, job_id, ctx.name, "evaluation queued", ctx.settings.lease_seconds):
                return "evaluate"
        return "skipped"  # cancelled or taken over meanwhile
    return _end(ctx, job_id, machine.SUCCEEDED, None, cleanup=True)


def fail_job(ctx: WorkerContext, job_id: str, error: str) -> None:
    """Fail a job from outside the normal flow (soft time limit, unexpected exception)."""
    with ctx.sessions() as session:
        if not machine.finish(session, job_id, ctx.name, machine.FAILED, error=error):
            machine.fail_unclaimed(session, job_id, error)


def _end(ctx: WorkerContext, job_id: str, status: str, error: str | None, *, cleanup: bool) -> str:
    with ctx.sessions() as session:
        owned = machine.finish(session, job_id, ctx.name, status, error=error)
    # layer checkpoints are only worth keeping for a retry of a failed job; a job this worker no
    # longer owns keeps them for whoever owns it now
    if cleanup and owned:
        shutil.rmtree(ctx.store.work_dir(job_id), ignore_errors=True)
    log.info("job %s %s%s", job_id, status, f": {error}" if error else "")
    return status


def _run_stages(ctx: WorkerContext, job: Job, reporter: Reporter, step: str) -> str:
    """Run what the job still needs; "evaluate" asks for a hand-off to the evaluation step, "done" ends it."""
    from rsavq_core.models.resolve import resolve_model

    cfg = job_config(job)
    reporter("resolve", 0, 1)
    folder = resolve_model(job.model_id)  # offline and fast: an unknown id fails here, in seconds
    with ctx.sessions() as session:
        published = session.get(Artifact, job.id) is not None
    evaluation = (job.options or {}).get("evaluation") or {"perplexity": True}
    wants_eval = bool(evaluation.get("perplexity", True) or evaluation.get("zero_shot") or evaluation.get("datasets"))
    if not published:
        _preflight(ctx, folder, cfg)
        _quantize_and_publish(ctx, job, cfg, reporter)
        if wants_eval and step == "quantize":
            return "evaluate"  # its own task: it may run on another worker (or queue)
    if wants_eval:  # the evaluation step, or a redelivery of a job that had already published
        from worker.evaluate import evaluate_job

        metrics = evaluate_job(ctx, job, folder, evaluation, reporter)
        _merge_metrics(ctx, job.id, metrics)
    return "done"


def _preflight(ctx: WorkerContext, folder: Any, cfg: QuantConfig) -> None:
    """Fail the job at once, with the figures, when no live worker can hold it; release it for
    another worker when this one cannot but another can (routing by capability: host memory, and
    the device's memory on a GPU worker, each against the estimate for that kind of device)."""
    from rsavq_core.models.memory import estimate_job_memory
    from rsavq_core.pipeline.placement import Placement

    placement = Placement.from_settings()
    streamed = placement.streams(cfg)
    estimates: dict[str, MemoryEstimate | None] = {}

    def estimate_for(device: str) -> MemoryEstimate | None:
        kind = device.split(":")[0]
        if kind not in estimates:  # a GPU computes only streamed: a whole-model job cannot run there
            can_run = kind == "cpu" or streamed
            estimates[kind] = (
                estimate_job_memory(
                    folder, cfg, streamed=streamed, device=kind, activation_budget=placement.activation_budget_bytes
                )
                if can_run
                else None
            )
        return estimates[kind]

    own = worker_capacity(ctx.settings)
    live_after = utcnow() - dt.timedelta(seconds=3 * max(ctx.settings.lease_seconds, 10))
    with ctx.sessions() as session:
        rows = session.execute(
            select(Worker.memory_bytes, Worker.device, Worker.device_memory_bytes).where(Worker.last_seen > live_after)
        ).all()
    route(own, [Capacity(float(m), d or "cpu", dm) for m, d, dm in rows], estimate_for)


def route(own: Capacity, others: list[Capacity], estimate_for: Callable[[str], MemoryEstimate | None]) -> None:
    """Return when this worker (``own``) can hold the job; ``WrongWorker`` when only another live one
    can; ``InsufficientMemoryError`` with the figures when none can. ``estimate_for(device)``: the
    job's estimate on that kind of device, None where it cannot run there."""
    from rsavq_core.models.memory import GIB, MemoryEstimate, check_fits

    def fits(capacity: Capacity) -> bool:
        estimate = estimate_for(capacity.device)
        if estimate is None or estimate.total > capacity.memory_bytes:
            return False
        return capacity.device_memory_bytes is None or estimate.device_total <= capacity.device_memory_bytes

    workers = [own, *others]
    if not any(fits(w) for w in workers):
        largest = max(workers, key=lambda w: (w.device_memory_bytes or 0.0, w.memory_bytes))
        estimate = estimate_for(largest.device) or estimate_for("cpu")
        assert estimate is not None
        check_fits(estimate, max(w.memory_bytes for w in workers))  # raises with the figures
        device_estimate = MemoryEstimate(estimate.parameters, estimate.device_terms)
        check_fits(device_estimate, largest.device_memory_bytes or 0.0, who=f"the largest worker's {largest.device}")
    own_estimate = estimate_for(own.device)
    described = own_estimate.describe() if own_estimate else "the whole model (CPU only)"
    log.info("pre-flight: needs %s; this worker has %.2f GiB on %s", described, own.memory_bytes / GIB, own.device)
    if not fits(own):  # a worker that can hold it exists: let it take the job
        raise WrongWorker(f"needs {described}; this worker has {own.memory_bytes / GIB:.2f} GiB on {own.device}")


def worker_capacity(settings: Settings) -> Capacity:
    """This worker's host memory, compute device and the device's memory."""
    from rsavq_core.pipeline.placement import Placement

    device = Placement.from_settings().device
    device_bytes = None
    if device.type == "cuda":
        import torch

        device_bytes = float(torch.cuda.get_device_properties(device).total_memory)
    return Capacity(worker_capacity_bytes(settings), str(device), device_bytes)


def worker_capacity_bytes(settings: Settings) -> float:
    if settings.worker_memory_gb is not None:
        return settings.worker_memory_gb * 2**30
    import psutil

    return float(psutil.virtual_memory().total)


def _quantize_and_publish(ctx: WorkerContext, job: Job, cfg: QuantConfig, reporter: Reporter) -> None:
    from rsavq_core.checkpoint.bitcount import model_bits
    from rsavq_core.pipeline.placement import Placement
    from rsavq_core.pipeline.quantize import quantize_model, save_result

    work = ctx.store.work_dir(job.id)
    started = time.perf_counter()
    calibration = calibration_text(ctx, job)
    result = quantize_model(
        job.model_id,
        cfg,
        progress=reporter,
        checkpoint_dir=work / "layers",
        on_layer=reporter.layer,
        calibration_text=calibration,
        placement=Placement.from_settings(),
        allow_partial=bool((job.options or {}).get("allow_partial", False)),
    )
    reporter("package", 0, 1)
    packed = save_result(result, work / "packed")
    relative, size, sha256 = ctx.store.publish(job.id, packed)
    bits = model_bits(result.layers, result.model)
    bits.pop("layers", None)
    metrics = {
        "bits": bits,
        "timings": {**result.timings, "publish": time.perf_counter() - started - result.timings.get("total", 0.0)},
        "stats_cached": result.stats_cached,
        "peak_rss_gb": result.peak_rss_gb,
        "coverage": result.coverage,  # what stayed in float
        "artifact_bytes": size,
        "calibration_text": None if calibration is None else {"name": calibration.name, "sha256": calibration.sha256},
    }
    with ctx.sessions() as session:
        session.merge(Artifact(job_id=job.id, path=relative, size=size, sha256=sha256))
        session.execute(update(Job).where(Job.id == job.id).values(effective_bpw=bits["quantized"]["bpw"]))
        session.commit()
    _merge_metrics(ctx, job.id, metrics)
    log.info("job %s: published %s (%d bytes, sha256 %s)", job.id, relative, size, sha256[:12])


def _merge_metrics(ctx: WorkerContext, job_id: str, values: dict[str, Any]) -> None:
    with ctx.sessions() as session:
        row = session.get(JobMetrics, job_id)
        data = json.loads(json.dumps({**(row.data if row else {}), **values}, default=float))
        session.merge(JobMetrics(job_id=job_id, data=data, updated_at=utcnow()))
        session.commit()
