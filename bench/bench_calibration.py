"""How the calibration data and the Hessian's treatment change one method's quality (and time).

Each configuration is ``--base`` knobs plus one grid entry, quantized and evaluated by perplexity
(``wiki-holdout-512``) in a fresh process; statistics are cached per (windows, sampling), so
entries that differ only in quantization knobs reuse them. Rows finished by an earlier run with
the same configuration are kept (the JSON is rewritten after every row), so an interrupted run
resumes. Every row records its resolved config, evaluation and provenance: ``--replay FILE.json``
runs the recorded rows again exactly (``bench_quality.py``'s replay), whatever the defaults are by then.

    python bench/bench_calibration.py --model smollm2-135m --method gptq --bits 3 \\
        --base '{"group_size": 64}' \\
        --grid '[{"calib_sampling": "first"}, {}, {"sink_share": 0.1}, {"calib_samples": 128, "sink_share": 0.1}]' \\
        --json bench/results/calibration-gptq-3bit.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.runs.summaries import in_fresh_process, quantize_summary


def row_of(knobs: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    ppl = summary["eval"]["perplexity"]
    return {
        "label": json.dumps(knobs),
        "model": summary["model"],
        "knobs": knobs,
        "ppl": ppl["ppl"],
        "protocol": ppl["protocol"],
        "bpw": summary["bits"]["quantized"]["bpw"],
        "seconds": summary["timings"].get("total"),
        "statistics_seconds": summary["timings"].get("statistics"),
        "stats_cached": summary["stats_cached"],
        "peak_rss_gb": summary["peak_rss_gb"],
        "finetune": summary.get("finetune"),
        "config": summary["config"],
        "evaluation": summary["evaluation"],
        "provenance": summary["provenance"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    if "--replay" in (sys.argv[1:] if argv is None else argv):
        from bench_quality import main as replay  # the same rows: resolved configs, evaluations

        return replay(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--bits", type=float, default=3.0)
    ap.add_argument("--base", default="{}", help="JSON knobs every row shares")
    ap.add_argument("--grid", required=True, help="JSON list of knob dicts, one row each")
    ap.add_argument("--windows", type=int, help="perplexity windows (default: the protocol's 64)")
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    base, grid = json.loads(args.base), json.loads(args.grid)
    out = Path(args.json)
    saved = json.loads(out.read_text()) if out.is_file() else {}
    rows: list[dict[str, Any]] = saved.get("rows", []) if saved.get("model") == args.model else []
    evaluation = {"ppl": True, "tasks": None, "limit": None, "perplexity_windows": args.windows}
    for entry in grid:
        knobs = {**base, **entry}
        cfg = QuantConfig.for_method(args.method, bits=args.bits, **knobs)  # validated before anything runs
        if any(r["config"] == cfg.to_dict() for r in rows):
            continue
        summary = in_fresh_process(json.dumps(knobs), quantize_summary, args.model, cfg, evaluation=evaluation)
        rows.append(row_of(knobs, summary))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": args.model, "method": args.method, "rows": rows}, indent=1))
        sys.stdout.write(f"{json.dumps(knobs):<70} ppl {rows[-1]['ppl']:9.2f}\n")
        sys.stdout.flush()
    sys.stdout.write("\n| knobs | bpw | PPL | s (statistics) |\n|---|---|---|---|\n")
    for r in rows:
        stats = "cached" if r["stats_cached"] else f"{r['statistics_seconds'] or 0:.0f}"
        sys.stdout.write(
            f"| `{json.dumps(r['knobs'])}` | {r['bpw']:.4f} | {r['ppl']:.2f} | {r['seconds']:.0f} ({stats}) |\n"
        )
    return {"rows": rows}


if __name__ == "__main__":
    main()
