"""The current defaults' results: quantize, evaluate, time and record each named run, with provenance.

Each row runs in a fresh process (its peak RSS is its own); with ``--empty-cache`` (the default)
each row gets an empty cache directory, so its time includes converting the model and computing
the calibration statistics: what a user's first job costs. Every row records its resolved config,
its evaluation settings and its provenance (commit, machine with measured GFLOP/s, versions, date,
command), so ``--replay FILE.json`` runs exactly the recorded configurations again (also rows of
``rsavq quantize`` / ``rsavq ablation`` / ``bench_calibration.py`` output) whatever the defaults
are by then, and prints the recorded and the new numbers side by side. Rows already in ``--json``
with the same configuration and evaluation are kept, so an interrupted run resumes.

    python bench/bench_quality.py --json bench/results/defaults.json                 # every row below
    python bench/bench_quality.py --rows "fast 3 bits" --json runs/fast3.json
    python bench/bench_quality.py --replay bench/results/defaults.json --rows "RTN 3 bits g64"
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.runs.provenance import provenance
from rsavq_core.runs.replay import RecordedRun, recorded_args, summary_runs
from rsavq_core.runs.summaries import evaluate_summary, in_fresh_process, parse_tasks, quantize_summary
from rsavq_core.runs.tables import fmt, perplexity, quality_table
from rsavq_core.settings import override

# label -> (method, bits, knobs); None: the float model. The knobs are what a user types: the
# defaults resolve at run time and each row records what they resolved to.
ROWS: dict[str, tuple[str, float, dict[str, Any]] | None] = {
    "FP": None,
    "default 2 bits": ("rsavq", 2.0, {}),
    "default 3 bits": ("rsavq", 3.0, {}),
    "default 4 bits": ("rsavq", 4.0, {}),
    "fast 2 bits": ("rsavq", 2.0, {"preset": "fast"}),
    "fast 3 bits": ("rsavq", 3.0, {"preset": "fast"}),
    "RTN 3 bits g64": ("rtn", 3.0, {"group_size": 64}),
    "GPTQ 3 bits g64": ("gptq", 3.0, {"group_size": 64}),
}


def planned_runs(args: argparse.Namespace) -> list[RecordedRun]:
    """The rows to run: named rows of ``ROWS``, or the rows recorded in ``--replay``'s file."""
    if args.replay is not None:
        runs = summary_runs(args.replay)
        return [r for r in runs if not args.rows or r.label in args.rows]
    unknown = sorted(set(args.rows or []) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown}; rows: {list(ROWS)}")
    evaluation = {
        "ppl": True,
        "tasks": parse_tasks(args.tasks),
        "limit": args.limit,
        "perplexity_windows": args.windows,
    }
    runs = []
    for label, spec in ROWS.items():
        if args.rows and label not in args.rows:
            continue
        cfg = None if spec is None else QuantConfig.for_method(spec[0], bits=spec[1], **spec[2])
        runs.append(RecordedRun(label, args.model, cfg, evaluation, {}))
    return runs


def run_row(run: RecordedRun, empty_cache: bool, scratch: Path) -> dict[str, Any]:
    """One row in a fresh process (with an empty cache directory of its own when asked)."""
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=scratch)) if empty_cache else None
    try:
        with override(**({"cache_dir": cache} if cache else {})):
            t0 = time.perf_counter()
            if run.config is None:
                summary = in_fresh_process(run.label, evaluate_summary, run.model, run.evaluation)
            else:
                summary = in_fresh_process(
                    run.label, quantize_summary, run.model, run.config, evaluation=run.evaluation
                )
            wall = time.perf_counter() - t0
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
    return {"label": run.label, **summary, "wall_s": wall, "empty_cache": empty_cache}


def _same_run(row: dict[str, Any], run: RecordedRun) -> bool:
    config = None if run.config is None else run.config.to_dict()
    return (
        row.get("label") == run.label
        and row.get("config") == config
        and row.get("evaluation")
        == {
            **run.evaluation,
            "texts": [],
        }
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", nargs="+", metavar="LABEL", help=f"only these rows (default: all of {list(ROWS)})")
    ap.add_argument("--tasks", default="all", help="zero-shot tasks ('all': the paper's five; '' for none)")
    ap.add_argument("--limit", type=int, default=50, help="first N items of each zero-shot task")
    ap.add_argument("--windows", type=int, help="perplexity windows (default: the protocol's 64)")
    ap.add_argument("--cached", action="store_true", help="share the user's cache instead of an empty one per row")
    ap.add_argument("--scratch", type=Path, default=Path("runs/bench-quality"), help="where empty caches live")
    ap.add_argument("--json", type=Path, help="default: bench/results/defaults.json, or FILE.replay.json")
    ap.add_argument("--replay", type=Path, metavar="FILE.json", help="run the rows recorded in FILE again, exactly")
    args = ap.parse_args(argv)
    if args.json is None:
        args.json = args.replay.with_suffix(".replay.json") if args.replay else Path("bench/results/defaults.json")
    runs = planned_runs(args)
    out: Path = args.json
    saved = json.loads(out.read_text()) if out.is_file() else {}
    rows: list[dict[str, Any]] = list(saved.get("rows", []))
    args.scratch.mkdir(parents=True, exist_ok=True)
    for run in runs:
        if any(_same_run(r, run) for r in rows):
            continue  # resumed: measured by an earlier, interrupted run
        rows = [r for r in rows if r.get("label") != run.label]
        rows.append(run_row(run, not args.cached, args.scratch))
        out.parent.mkdir(parents=True, exist_ok=True)
        result = {"model": args.model, "rows": rows, "provenance": {**provenance(), "args": recorded_args(args)}}
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")  # partial results survive a crash
        sys.stdout.write(f"{run.label}: perplexity {fmt(perplexity(rows[-1]))}\n")
    sys.stdout.write(quality_table(rows))
    if args.replay is not None:
        sys.stdout.write(_comparison(runs, rows))
    return {"rows": rows}


def _comparison(runs: list[RecordedRun], rows: list[dict[str, Any]]) -> str:
    lines = ["\n| run | recorded perplexity | replayed | recorded bpw | replayed |\n|---|---|---|---|---|"]
    for run in runs:
        now = next((r for r in rows if r.get("label") == run.label), {})
        bpw_then = ((run.record.get("bits") or {}).get("quantized") or {}).get("bpw")
        bpw_now = ((now.get("bits") or {}).get("quantized") or {}).get("bpw")
        lines.append(
            f"| {run.label} | {fmt(perplexity(run.record))} | {fmt(perplexity(now))} | "
            f"{fmt(bpw_then, 4)} | {fmt(bpw_now, 4)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
