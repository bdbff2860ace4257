"""The paper's ablation (Table 3) plus the scalar baselines, side by side, on one model.

Every row runs in a fresh process (``multiprocessing`` spawn) so that its peak memory is its own.
The first RSAVQ row of the run computes the calibration statistics (unless cached); the other rows
reuse them, and the table says which rows did.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.errors import ConfigError
from rsavq_core.methods.registry import methods
from rsavq_core.runs.summaries import evaluate_summary, in_fresh_process, parse_tasks, quantize_summary
from rsavq_core.runs.tables import fmt

log = logging.getLogger(__name__)

# The VQ rows add one feature at a time, from plain k-means to the full pipeline, so that each
# row's change is the feature's own effect. Every row names the state of every feature (not only
# the one it adds), so the rows do not change meaning when a default changes.
FEATURES_OFF: dict[str, Any] = {
    "metric": "euclidean",
    "lam": 0.0,
    "allocation": "uniform",
    "compensate": False,
    "refit": "mean",
    "row_scales": False,
    "share_codebooks": False,
    "outliers": 0.0,
    "block_finetune_steps": 0,
    "block_finetune_norms": False,
    "finetune_target": "block",
    "model_finetune_steps": 0,
}
# What each feature is set to when its row turns it on (fine-tuning steps: the ablation's own
# schedule, chosen so that a row fits in minutes on 2 CPU cores; see the README's measurements).
FEATURE_STEPS: list[tuple[str, dict[str, Any]]] = [
    ("k-means (Euclidean)", {}),
    ("k-means (Fisher metric)", {"metric": "fisher_diag"}),
    ("+EDSG shift", {"lam": 0.05}),
    ("+WCSG", {"allocation": "proportional"}),
    ("+ error feedback", {"compensate": True, "refit": "output"}),
    ("+ block-wise fine-tuning", {"block_finetune_steps": 64, "block_finetune_norms": True}),
    ("+ end-to-end fine-tuning", {"model_finetune_steps": 64}),
]


def _cumulative_rows() -> list[tuple[str, str, dict[str, Any]]]:
    rows, knobs = [], dict(FEATURES_OFF)
    for label, turned_on in FEATURE_STEPS:
        knobs = {**knobs, **turned_on}
        rows.append((label, "rsavq", dict(knobs)))
    return rows


# (label, method, knobs). Order matters: the first row that needs gradients computes the statistics.
ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("RTN g64", "rtn", {"group_size": 64}),
    ("GPTQ g64", "gptq", {"group_size": 64}),
    *_cumulative_rows(),
    ("default", "rsavq", {}),  # the defaults, whatever they are: what a user gets without flags
]


def all_rows() -> list[tuple[str, str, dict[str, Any]]]:
    """``ROWS``, then one row at its defaults for every registered method no row above runs: a
    method added to the registry appears in the ablation without an edit here."""
    covered = {method for _, method, _ in ROWS}
    return [*ROWS, *[(f"{m.name} (defaults)", m.name, {}) for m in methods() if m.name not in covered]]


def _eval_flags(tasks: str | None, limit: int | None, windows: int | None) -> list[str]:
    """The evaluation settings as the command line spells them: the key under which rows resume."""
    flags = ["--ppl"]
    if tasks:
        flags += ["--tasks", tasks]
    if limit:
        flags += ["--limit", str(limit)]
    if windows:
        flags += ["--windows", str(windows)]
    return flags


def run_ablation(
    model: str,
    bits: list[float],
    *,
    out_dir: Path,
    tasks: str | None = "all",
    limit: int | None = 100,
    windows: int | None = None,
    calib_samples: int | None = None,
    rows: list[str] | None = None,
) -> dict[str, Any]:
    """Run every row (or those labelled in ``rows``) at every bit width; write ``ablation.json`` and
    ``ablation.md`` in out_dir. Rows finished by an earlier run with the same evaluation are kept."""
    planned = all_rows()
    unknown = sorted(set(rows or []) - {label for label, _, _ in planned})
    if unknown:
        raise ConfigError(f"unknown ablation row(s) {', '.join(unknown)}; rows: {', '.join(r[0] for r in planned)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    flags = _eval_flags(tasks, limit, windows)
    evaluation = {"ppl": True, "tasks": parse_tasks(tasks), "limit": limit, "perplexity_windows": windows}
    calib: dict[str, Any] = {"calib_samples": calib_samples} if calib_samples else {}
    done = _finished_rows(out_dir / "ablation.json", model, flags)
    t0 = time.perf_counter()
    if not any(r["label"] == "FP" for r in done):
        done.append(_fp_row(model, evaluation, flags))
    for b in bits:
        for label, method, knobs in planned:
            if rows and label not in rows:
                continue
            if any(r["label"] == label and r["target_bits"] == b for r in done):
                continue  # resumed: this row finished in an earlier run with the same evaluation
            cfg = QuantConfig.for_method(method, bits=b, **knobs, **calib)  # validated before the row starts
            same = next((r for r in done if r["target_bits"] == b and r.get("config") == cfg.to_dict()), None)
            if same is not None:  # e.g. the defaults are the last feature row: measured once, shown twice
                done.append({**same, "label": label, "same_as": same["label"]})
                continue
            summary = in_fresh_process(label, quantize_summary, model, cfg, evaluation=evaluation)
            done.append({"target_bits": b, "label": label, "eval_flags": flags, **summary})
            _write(out_dir, model, done, limit)  # partial results survive a crash
    result = {"model": model, "rows": done, "seconds": time.perf_counter() - t0}
    _write(out_dir, model, done, limit)
    return {"json": str(out_dir / "ablation.json"), "markdown": str(out_dir / "ablation.md"), **result}


def _fp_row(model: str, evaluation: dict[str, Any], flags: list[str]) -> dict[str, Any]:
    """The float model's row: its evaluation, measured in a fresh process."""
    fp = in_fresh_process("FP", evaluate_summary, model, evaluation)
    fp_eval = {k: v for k, v in fp.items() if k in ("perplexity", "zero_shot")}
    row = {"target_bits": None, "label": "FP", "eval_flags": flags, "eval": fp_eval}
    return {**row, "provenance": fp.get("provenance")}


def _finished_rows(path: Path, model: str, flags: list[str]) -> list[dict[str, Any]]:
    """Rows of an earlier, interrupted run of the same model and evaluation settings."""
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    if saved.get("model") != model:
        return []
    return [r for r in saved.get("rows", []) if r.get("eval_flags") == flags]


def _display_order(rows: list[dict[str, Any]]) -> list[str]:
    """FP, the planned rows in order, then any other label the results hold (rows of methods
    registered when they ran)."""
    order = ["FP", *[label for label, _, _ in all_rows()]]
    return list(dict.fromkeys([*order, *(r["label"] for r in rows)]))


def markdown_table(rows: list[dict[str, Any]], limit: int | None) -> str:
    head = (
        "| bits | method | eff. bpw (quantized layers) | PPL wiki-holdout-512 | zero-shot avg | "
        "quantize s (stats) | peak RSS GB |\n|---|---|---|---|---|---|---|\n"
    )
    lines = []
    fp = next(r for r in rows if r["label"] == "FP")
    for b in sorted({r["target_bits"] for r in rows if r["target_bits"] is not None}):
        group = {r["label"]: r for r in rows if r["target_bits"] == b}
        for label in _display_order(rows):
            r = fp if label == "FP" else group.get(label)
            if r is None:
                continue
            ev = r.get("eval", {})
            ppl = ev.get("perplexity", {}).get("ppl")
            zs = ev.get("zero_shot", {}).get("average")
            bpw = r["bits"]["quantized"]["bpw"] if "bits" in r else None
            t = r.get("timings", {})
            stats = "cached" if r.get("stats_cached") else fmt(t.get("statistics"), 0)
            timing = f"{fmt(t.get('total'), 0)} ({stats})" if t else "–"
            lines.append(
                f"| {b:g} | {label} | {fmt(bpw, 4) if bpw else '16 (fp16)'} | {fmt(ppl)} | "
                f"{fmt(zs * 100 if zs is not None else None, 1)} | {timing} | "
                f"{fmt(r.get('peak_rss_gb'))} |"
            )
    note = f"\nZero-shot: first {limit} items of each task.\n" if limit else ""
    return head + "\n".join(lines) + "\n" + note


def _write(out_dir: Path, model: str, rows: list[dict[str, Any]], limit: int | None) -> None:
    (out_dir / "ablation.json").write_text(json.dumps({"model": model, "rows": rows}, indent=1, default=str))
    (out_dir / "ablation.md").write_text(f"# Ablation: {model}\n\n" + markdown_table(rows, limit))
