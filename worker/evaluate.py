"""The evaluation stage: quantized metrics from the published artifact, FP metrics from a cache.

The quantized model is loaded from the artifact as published (not from the in-memory layers), so
a resumed job and an uninterrupted one are evaluated on the same bytes. FP metrics depend only on
the model and the evaluation settings, so they are computed once per model and reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rsavq_core.atomic import write_json
from rsavq_core.config.quant_config import ZERO_SHOT_TASKS
from rsavq_core.progress import Progress
from service.db import Job
from worker.reporter import Reporter
from worker.runner import WorkerContext

log = logging.getLogger(__name__)


def _settings(evaluation: dict[str, Any]) -> dict[str, Any]:
    tasks = evaluation.get("zero_shot")
    return {
        "ppl": bool(evaluation.get("perplexity", True)),
        "tasks": list(ZERO_SHOT_TASKS) if tasks == "all" else (tasks or None),
        "limit": evaluation.get("limit"),
        "perplexity_windows": evaluation.get("windows"),
    }


def evaluate_job(
    ctx: WorkerContext, job: Job, folder: Path, evaluation: dict[str, Any], reporter: Reporter
) -> dict[str, Any]:
    from rsavq_core.evaluation import evaluate_model
    from rsavq_core.models.resolve import model_fingerprint
    from rsavq_core.pipeline.placement import Placement
    from rsavq_core.runtime import load_quantized_model
    from rsavq_core.runtime.loading import load_float_model
    from worker.runner import evaluation_texts

    kwargs = _settings(evaluation)
    texts = evaluation_texts(ctx, job)
    key = {**kwargs, "texts": [t.sha256 for t in texts]} if texts else kwargs  # unchanged key without texts
    fp_file = _fp_cache_file(ctx, model_fingerprint(folder), key)
    if fp_file.exists():
        fp = json.loads(fp_file.read_text())
    else:
        placement = Placement.from_settings()
        model, tokenizer, _ = load_float_model(str(folder), placement.device, placement.stream)
        fp = evaluate_model(model, tokenizer, progress=_prefixed(reporter, "fp "), texts=texts, **kwargs)
        del model
        write_json(fp_file, fp, default=float)
    packed = ctx.store.work_dir(job.id) / "packed"
    if not (packed / "rsavq.safetensors").exists():  # redelivered after publishing: unpack the artifact
        packed = _unpack(ctx, job.id)
    model, tokenizer, _ = load_quantized_model(str(packed))
    quantized = evaluate_model(model, tokenizer, progress=reporter, texts=texts, **kwargs)
    described = [{"name": t.name, "sha256": t.sha256, "documents": len(t.documents)} for t in texts]
    return {"fp": fp, "quantized": quantized, "evaluation": {**kwargs, "texts": described}}


def _prefixed(reporter: Reporter, prefix: str) -> Progress:
    def progress(stage: str, done: int, total: int, detail: Mapping[str, float] | None = None) -> None:
        reporter(prefix + stage, done, total, detail)

    return progress


def _fp_cache_file(ctx: WorkerContext, fingerprint: str, kwargs: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:16]
    folder = ctx.settings.data_dir / "fp-metrics"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{fingerprint}-{digest}.json"


def _unpack(ctx: WorkerContext, job_id: str) -> Path:
    from sqlalchemy import select

    from service.artifacts import extract
    from service.db import Artifact

    with ctx.sessions() as session:
        artifact = session.scalar(select(Artifact).where(Artifact.job_id == job_id))
    assert artifact is not None, job_id
    dest = ctx.store.work_dir(job_id) / "unpacked"
    dest.mkdir(parents=True, exist_ok=True)
    return extract(ctx.store.path(artifact.path), dest)
