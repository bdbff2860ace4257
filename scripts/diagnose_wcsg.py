"""Why does WCSG help or hurt? Per-layer output-error proxy under each bit-allocation rule.

For a few decoder blocks of a model whose calibration statistics are cached, quantize every linear
with uniform bits (+EDSG), the paper's proportional rule (+WCSG) and the additive rule, and print
the per-group bits and the Hessian proxy tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) (the relative output error on
calibration activations). Writes the rows as JSON too.

Usage: python scripts/diagnose_wcsg.py [--model smollm2-135m] [--bits 2] [--blocks 0 15 29]
"""

from __future__ import annotations

import argparse
import json
import sys

from rsavq_core.algorithms.vq import quantize_vq
from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.models.layout import find_decoder_layout
from rsavq_core.models.resolve import load_model
from rsavq_core.pipeline.calibration import calibration_store

RULES = ("uniform", "proportional", "additive")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bits", type=float, default=2.0)
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 15, 29])
    parser.add_argument("--json", default="bench/results/diagnose_wcsg.json")
    args = parser.parse_args()
    model, tokenizer, folder = load_model(args.model)
    cfg = QuantConfig.for_method("rsavq", bits=args.bits)
    store, _ = calibration_store(model, tokenizer, folder, cfg)
    layout = find_decoder_layout(model)
    rows = []
    sys.stdout.write(f"{'layer':<28}" + "".join(f"{r:>30}" for r in RULES) + "\n")
    for index in args.blocks:
        stats = store.load_block(index)
        for name in layout.linear_names(index):
            weight = layout.blocks[index].get_submodule(name).weight
            row = {"layer": f"{index}.{name}"}
            for rule in RULES:
                _, report = quantize_vq(weight, stats[name], cfg.replace(allocation=rule))
                row[rule] = {
                    "bits": report.bits,
                    "hessian_error": report.hessian_error,
                    "sensitivity": report.sensitivity,
                }
            rows.append(row)
            cells = "".join(f"{str(row[r]['bits']):>16} {row[r]['hessian_error']:>12.4f} " for r in RULES)
            sys.stdout.write(f"{row['layer']:<28}{cells}\n")
    mean = {r: sum(x[r]["hessian_error"] for x in rows) / len(rows) for r in RULES}
    sys.stdout.write("mean hessian error: " + ", ".join(f"{r} {v:.4f}" for r, v in mean.items()) + "\n")
    with open(args.json, "w") as fh:
        json.dump({"bits": args.bits, "rows": rows, "mean": mean}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
