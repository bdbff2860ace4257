"""Embeddings in the budget: ``--embedding-bits`` off, 4 and 3 on the bundled model, and which grid.

Main rows: the whole pipeline (``quantize_summary``) with the blocks quantized by ``--method`` and
the input embedding (and an untied head) at each ``--embedding-bits``, each in a fresh process:
perplexity, bits per weight of the quantized layers and of the whole checkpoint, and the packed
file's size. Sweep rows (``--sweep``): the row-wise grid's group size, measured on one
quantization of the blocks with only the embedding's grid changed (the blocks' layers do not
depend on it), perplexity on ``--sweep-windows`` windows.

    python bench/bench_embeddings.py --out bench/results/embeddings.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "gptq4": ("gptq", {"bits": 4, "group_size": 128}),
    "fast2": ("rsavq", {"bits": 2, "preset": "fast"}),
}


def main_row(
    model: str, method: str, knobs: dict[str, Any], embedding_bits: int | None, windows: int
) -> dict[str, Any]:
    """One quantization with ``embedding_bits`` (None: off), saved and evaluated, in this process."""
    from rsavq_core.checkpoint.packed import WEIGHTS_FILE
    from rsavq_core.config.quant_config import QuantConfig
    from rsavq_core.runs.summaries import quantize_summary

    cfg = QuantConfig.for_method(method, embedding_bits=embedding_bits, **knobs)
    with tempfile.TemporaryDirectory(prefix="rsavq-bench-embeddings-") as tmp:
        evaluation = {"ppl": True, "tasks": None, "perplexity_windows": windows}
        summary = quantize_summary(model, cfg, out=Path(tmp) / "packed", evaluation=evaluation)
        summary["artifact_mb"] = (Path(summary["out"]) / WEIGHTS_FILE).stat().st_size / 1e6
    return summary


def sweep_rows(
    model: str, method: str, knobs: dict[str, Any], grids: list[tuple[int, int]], windows: int
) -> dict[str, Any]:
    """Perplexity and whole-checkpoint bpw for each (bits, group size) of the embedding's grid, the
    blocks quantized once (a group size of 0: one group per row)."""
    import copy

    from rsavq_core.checkpoint.bitcount import model_bits
    from rsavq_core.config.quant_config import QuantConfig
    from rsavq_core.evaluation import evaluate_model
    from rsavq_core.pipeline.embeddings import quantize_embeddings
    from rsavq_core.pipeline.quantize import quantize_model
    from rsavq_core.runtime import quantize_in_place

    result = quantize_model(model, QuantConfig.for_method(method, **knobs))
    width = result.model.get_input_embeddings().embedding_dim
    rows: dict[str, Any] = {}
    for bits, group in grids:
        embeddings = quantize_embeddings(result.model, bits, group or width)
        layers = {**result.layers, **embeddings}
        quantized = quantize_in_place(copy.deepcopy(result.model), layers)
        evaluation = evaluate_model(quantized, result.tokenizer, ppl=True, perplexity_windows=windows)
        bits_report = model_bits(layers, result.model)
        rows[f"{bits} bits, group {group or 'row'}"] = {
            "bits": bits,
            "group_size": group or width,
            "ppl": evaluation["perplexity"]["ppl"],
            "protocol": evaluation["perplexity"].get("protocol"),
            "all_bpw": bits_report["all_bpw"],
            "embedding_bpw": bits_report["layers"][next(iter(embeddings))],
        }
        sys.stdout.write(
            f"sweep {bits} bits group {group or 'row':>4}: perplexity {rows[next(reversed(rows))]['ppl']:.3f}\n"
        )
        sys.stdout.flush()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="gptq4", choices=list(METHODS))
    parser.add_argument("--embedding-bits", nargs="+", default=["off", "4", "3"])
    parser.add_argument("--windows", type=int, default=64, help="perplexity windows of the main rows")
    parser.add_argument("--sweep", action="store_true", help="also compare the grid's group sizes")
    parser.add_argument("--sweep-windows", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("bench/results/embeddings.json"))
    args = parser.parse_args()
    from rsavq_core.runs.provenance import provenance
    from rsavq_core.runs.replay import recorded_args
    from rsavq_core.runs.summaries import in_fresh_process

    origin = {**provenance(), "args": recorded_args(args)}
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    rows: dict[str, Any] = dict(previous.get("rows", {}))  # rows measured earlier stay, with their provenance
    method, knobs = METHODS[args.method]

    def write(extra: dict[str, Any] | None = None) -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        body = {"provenance": origin, "rows": rows, "sweep": previous.get("sweep", {}), **(extra or {})}
        args.out.write_text(json.dumps(body, indent=1, default=str) + "\n")

    for value in args.embedding_bits:
        embedding_bits = None if value == "off" else int(value)
        row = in_fresh_process(
            f"{args.method} embeddings {value}", main_row, args.model, method, knobs, embedding_bits, args.windows
        )
        rows[f"{args.method} / embeddings {value}"] = row
        write()
        sys.stdout.write(
            f"{args.method:6s} embeddings {value:>3s}: perplexity {row['eval']['perplexity']['ppl']:8.3f}  "
            f"bpw quantized {row['bits']['quantized']['bpw']:.3f}  whole {row['bits']['all_bpw']:.3f}  "
            f"{row['artifact_mb']:.1f} MB\n"
        )
        sys.stdout.flush()
    if args.sweep:
        grids = [(bits, group) for bits in (4, 3) for group in (32, 64, 128, 0)]
        sweep = {
            args.method: {
                "provenance": provenance(),
                "rows": sweep_rows(args.model, method, knobs, grids, args.sweep_windows),
            }
        }
        write({"sweep": {**previous.get("sweep", {}), **sweep}})


if __name__ == "__main__":
    main()
