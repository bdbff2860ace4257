"""Embeddings in the budget: ``--embedding-bits`` off, 4 and 3 on the bundled model, and which grid.

Main rows: the whole pipeline (``quantize_summary``) with the blocks quantized by ``--method`` and
the input embedding (and an untied head) at each ``--embedding-bits``, each in a fresh process:
perplexity, bits per weight of the quantized layers and of the whole checkpoint, and the packed
file's size. Sweep rows (``--sweep``): which grid, on the float model with only its embedding and
head quantized (bits x group size; the lookup and the head apart), perplexity on ``--sweep-windows``
windows.

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


def sweep_rows(model: str, grids: list[tuple[int, int]], windows: int) -> dict[str, Any]:
    """The embedding's grid alone: the float model with its (tied or untied) embedding and head
    quantized for each (bits, group size), a group size of 0 meaning one group per row; and, at
    the default group size, the lookup and the head quantized apart (which one costs the perplexity)."""
    import copy

    from torch import nn

    from rsavq_core.config.quant_config import QuantConfig
    from rsavq_core.evaluation.perplexity import perplexity
    from rsavq_core.models.resolve import load_model
    from rsavq_core.pipeline.calibration import calibration_tokens
    from rsavq_core.pipeline.embeddings import EMBEDDING_GROUP_SIZE, head_input_hessian, quantize_embeddings

    float_model, tokenizer, _ = load_model(model)
    rows: dict[str, Any] = {}

    def measure(label: str, bits: int, group: int, swap: tuple[str, ...], hessian: Any = None) -> None:
        quantized = copy.deepcopy(float_model)
        width = quantized.get_input_embeddings().embedding_dim
        layers = quantize_embeddings(quantized, bits, group or width, head_hessian=hessian)
        for name, layer in layers.items():
            if name in swap:  # the float module keeps its own class (and a tied head its tie): only values change
                module = quantized.get_submodule(name)
                module.weight = nn.Parameter(layer.dequantize())
        result = perplexity(quantized, tokenizer, n_windows=windows)
        groups = -(-width // (group or width))
        bpw = bits + groups * 2 * 16 / width  # codes, then an fp16 scale and zero per group of each row
        rows[label] = {"bits": bits, "group_size": group or width, "quantized": list(swap), "ppl": result["ppl"],
                       "protocol": result.get("protocol"), "embedding_bpw": bpw}  # fmt: skip
        sys.stdout.write(f"{label:32s} perplexity {result['ppl']:8.3f}  ({bpw:.2f} bits per weight)\n")
        sys.stdout.flush()

    names = tuple(quantize_embeddings(float_model, 8, EMBEDDING_GROUP_SIZE))  # the embedding's and the head's
    result = perplexity(float_model, tokenizer, n_windows=windows)
    rows["float"] = {"ppl": result["ppl"], "protocol": result.get("protocol")}
    for bits, group in grids:
        measure(f"{bits} bits, group {group or 'row'}", bits, group, names)
    for bits in sorted({b for b, _ in grids}, reverse=True):
        measure(f"{bits} bits, group {EMBEDDING_GROUP_SIZE}, lookup only", bits, EMBEDDING_GROUP_SIZE, names[:1])
        if len(names) > 1:
            measure(f"{bits} bits, group {EMBEDDING_GROUP_SIZE}, head only", bits, EMBEDDING_GROUP_SIZE, names[1:])
    # The pipeline's way when a head exists: GPTQ against the Hessian of the head's inputs on the
    # default calibration windows (``float_head_hessian``).
    tokens = calibration_tokens(tokenizer, QuantConfig())
    head = float_model.get_output_embeddings()
    hessian = head_input_hessian(float_model, head, tokens, 4) if head is not None else None
    for bits, group in grids:
        measure(f"{bits} bits, group {group or 'row'}, GPTQ head", bits, group, names, hessian)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="gptq4", choices=list(METHODS))
    parser.add_argument(
        "--embedding-bits", nargs="*", default=["off", "4", "3"], help="main rows (none: only the sweep)"
    )
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
        sweep = {"provenance": provenance(), "rows": sweep_rows(args.model, grids, args.sweep_windows)}
        write({"sweep": sweep})


if __name__ == "__main__":
    main()
