"""The library's whole runs as plain functions returning JSON-able summaries.

``rsavq quantize`` and ``rsavq eval`` print what these return; the ablation runs them in fresh
processes, one per row, so that each row's peak memory is its own.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rsavq_core.config.quant_config import ZERO_SHOT_TASKS, QuantConfig
from rsavq_core.data.text_files import TextSource, check_overlap
from rsavq_core.errors import RSAVQError
from rsavq_core.progress import Progress
from rsavq_core.settings import configure, get_settings

if TYPE_CHECKING:
    from rsavq_core.pipeline.placement import Placement

log = logging.getLogger(__name__)


def parse_tasks(tasks: str | None) -> list[str] | None:
    """A comma-separated task list, or "all" for the paper's five zero-shot tasks."""
    if not tasks:
        return None
    return list(ZERO_SHOT_TASKS) if tasks == "all" else [t.strip() for t in tasks.split(",") if t.strip()]


def quantize_summary(
    model_id: str,
    cfg: QuantConfig,
    *,
    out: str | Path | None = None,
    evaluation: dict[str, Any] | None = None,
    per_layer: bool = False,
    progress: Progress | None = None,
    calibration_text: TextSource | None = None,
    allow_overlap: bool = False,
    placement: Placement | None = None,
    allow_partial: bool = False,
) -> dict[str, Any]:
    """Quantize ``model_id``; optionally save the packed checkpoint to ``out`` and evaluate.

    ``evaluation`` holds ``evaluate_model``'s keyword arguments (``ppl``, ``tasks``, ``limit``,
    ``perplexity_windows``, ``texts``); the model is evaluated with its quantized layers swapped
    in. ``calibration_text``: the user's calibration text; evaluation texts sharing documents with
    it are refused before anything runs unless ``allow_overlap``. ``allow_partial``: see
    ``quantize_model``.
    """
    from rsavq_core.checkpoint.bitcount import model_bits
    from rsavq_core.models.resolve import resolve_model
    from rsavq_core.pipeline.placement import Placement
    from rsavq_core.pipeline.quantize import peak_rss_gb, quantize_model, save_result
    from rsavq_core.runs.provenance import provenance

    texts = list((evaluation or {}).get("texts") or [])
    overlap = check_overlap(calibration_text, texts, allow_overlap)
    resolve_model(model_id)  # an unknown model fails at once, before the provenance's measurement
    origin = provenance()  # before the run: the GFLOP/s figure and the load are the idle machine's
    placement = placement or Placement.from_settings()
    result = quantize_model(
        model_id,
        cfg,
        progress=progress,
        calibration_text=calibration_text,
        placement=placement,
        allow_partial=allow_partial,
    )
    summary: dict[str, Any] = {
        "model": model_id,
        "method": cfg.method,
        "config": result.config.to_dict(),
        # where it computed: the packed bytes depend on the compute dtype (``rsavq_core.precision``)
        "placement": {"device": str(placement.device), "compute_dtype": placement.compute_dtype},
        "evaluation": recorded_evaluation(evaluation),
        "provenance": origin,
        "texts": {
            "calibration": None if calibration_text is None else _describe(calibration_text),
            "evaluation": [_describe(t) for t in texts],
            "shared_documents": overlap,
        },
        "timings": result.timings,
        "stats_cached": result.stats_cached,
        "peak_rss_gb": result.peak_rss_gb,
        "bits": model_bits(result.layers, result.model),
        "coverage": result.coverage,
        "finetune": _finetune_summary(result.reports, result.model_finetune),
    }
    if out:
        summary["out"] = str(save_result(result, Path(out)))
    if evaluation and (evaluation.get("ppl") or evaluation.get("tasks") or texts):
        from rsavq_core.evaluation import evaluate_model
        from rsavq_core.runtime import quantize_in_place

        quantize_in_place(result.model, result.layers)
        summary["eval"] = evaluate_model(result.model, result.tokenizer, progress=progress, **evaluation)
    summary["peak_rss_gb"] = peak_rss_gb()  # ru_maxrss is monotonic: this covers evaluation too
    if per_layer:
        summary["layers"] = result.reports
    else:
        summary["bits"].pop("layers", None)
    return summary


def _describe(text: TextSource) -> dict[str, Any]:
    return {"name": text.name, "sha256": text.sha256, "format": text.format, "documents": len(text.documents)}


def recorded_evaluation(evaluation: dict[str, Any] | None) -> dict[str, Any]:
    """``evaluate_model``'s keyword arguments as a summary records them (texts by name and sha256),
    so that ``bench/bench_quality.py --replay`` can run the same evaluation again."""
    recorded = {k: v for k, v in (evaluation or {}).items() if k != "texts"}
    recorded["texts"] = [_describe(t) for t in (evaluation or {}).get("texts") or []]
    return recorded


def evaluate_summary(target: str, evaluation: dict[str, Any], progress: Progress | None = None) -> dict[str, Any]:
    """Evaluate a packed checkpoint folder or a float model id (``evaluate_model``'s keyword arguments)."""
    from rsavq_core.evaluation import evaluate_model
    from rsavq_core.pipeline.placement import Placement
    from rsavq_core.runs.provenance import provenance
    from rsavq_core.runtime.loading import load_any

    origin = provenance()
    placement = Placement.from_settings()  # a float model: streamed from its files unless the settings say otherwise
    model, tokenizer, info = load_any(target, device=placement.device, stream=placement.stream)
    return {
        **info,
        **evaluate_model(model, tokenizer, progress=progress, **evaluation),
        "target": target,
        "evaluation": recorded_evaluation(evaluation),
        "provenance": origin,
    }


def in_fresh_process(label: str, fn: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``fn(*args, **kwargs)`` in a new process (spawned) with this process's settings.

    Its peak memory is then its own (``peak_rss_gb`` in a summary measures one run, not a series).
    """
    log.info("run %s", label)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=configure, initargs=(get_settings(),)) as pool:
        try:
            return pool.submit(fn, *args, **kwargs).result()
        except RSAVQError as exc:
            raise RSAVQError(f"run {label!r} failed: {exc}") from exc


def _finetune_summary(reports: dict[str, dict[str, Any]], model_finetune: dict[str, Any]) -> dict[str, Any]:
    """Fine-tuning's effect: blocks tuned and kept, their mean relative error before and after;
    the end-to-end KL before and after. Empty when neither ran."""
    # every layer of a block carries its block's report: one per distinct report
    distinct = {json.dumps(r["finetune"], sort_keys=True): r["finetune"] for r in reports.values() if r.get("finetune")}
    blocks = list(distinct.values())
    out: dict[str, Any] = {}
    if blocks:
        out["blocks"] = {
            "tuned": len(blocks),
            "kept": sum(1 for b in blocks if b["kept"]),
            "mean_loss_before": sum(b["loss_before"] for b in blocks) / len(blocks),
            "mean_loss_after": sum(b["loss_after"] for b in blocks) / len(blocks),
        }
    if model_finetune:
        out["model"] = model_finetune
    return out
