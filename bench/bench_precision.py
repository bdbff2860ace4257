"""Compute dtypes against each other: the same quantization with float32 and bf16 calibration forwards.

``rsavq_core/precision.py`` runs the calibration passes' matrix products in bf16 on a GPU by
default; this measures what that costs in quality. Each row quantizes the model streamed, in a
fresh process, and evaluates perplexity on the protocol's windows (``--windows``). On a CPU
without bf16 instructions the bf16 rows are slower (emulated), so their times say nothing about a GPU.

    python bench/bench_precision.py --out bench/results/precision.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "GPTQ 3 bits g128": ("gptq", {"bits": 3, "group_size": 128}),
    "fast 2 bits": ("rsavq", {"bits": 2, "preset": "fast"}),
}


def run_row(model: str, method: str, knobs: dict[str, Any], dtype: str, windows: int) -> dict[str, Any]:
    """One quantization and its perplexity, in this (fresh) process."""
    from rsavq_core.config.quant_config import QuantConfig
    from rsavq_core.pipeline.placement import Placement
    from rsavq_core.runs.summaries import quantize_summary

    cfg = QuantConfig.for_method(method, **knobs)
    placement = Placement.from_settings(stream=True, compute_dtype=dtype)
    evaluation = {"ppl": True, "tasks": None, "perplexity_windows": windows}
    return quantize_summary(model, cfg, evaluation=evaluation, placement=placement)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--windows", type=int, default=16, help="perplexity windows")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=Path("bench/results/precision.json"))
    args = parser.parse_args()
    from rsavq_core.runs.provenance import provenance
    from rsavq_core.runs.replay import recorded_args
    from rsavq_core.runs.summaries import in_fresh_process

    origin = {**provenance(), "args": recorded_args(args)}
    previous = json.loads(args.out.read_text())["rows"] if args.out.is_file() else {}
    rows: dict[str, Any] = dict(previous)  # rows measured earlier stay (each row records its own provenance)
    for label in args.configs:
        method, knobs = CONFIGS[label]
        for dtype in args.dtypes:
            row = in_fresh_process(f"{label} {dtype}", run_row, args.model, method, knobs, dtype, args.windows)
            rows[f"{label} / {dtype}"] = row
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"provenance": origin, "rows": rows}, indent=1, default=str) + "\n")
            ppl = row["eval"]["perplexity"]["ppl"]
            sys.stdout.write(
                f"{label:18s} {dtype:9s} perplexity {ppl:9.3f}  statistics {row['timings'].get('statistics', 0):7.1f} s"
                f"  total {row['timings'].get('total', 0):7.1f} s\n"
            )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
