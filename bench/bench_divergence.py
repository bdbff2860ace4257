"""How far quantized artifacts' next-token distributions are from the float model's, per text.

For each artifact: the mean over tokens of KL(p_float || p_quantized) on the calibration windows
that end-to-end fine-tuning holds out for its keep-or-discard check (the last 4 of the run's
calibration windows) and on the first windows of the evaluation text, with the first position
(the attention sink) apart and the largest single-token KL. It asks whether the keep check's
windows speak for the evaluation text.

    python bench/bench_divergence.py --model smollm2-135m runs/default-3bit runs/default-2bit \\
        --json bench/results/quality/divergence.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from rsavq_core.data.windows import calibration_windows, evaluation_windows
from rsavq_core.finetune.end_to_end import MEASURE_BATCHES
from rsavq_core.models.resolve import resolve_model
from rsavq_core.runs.replay import parse_args, record
from rsavq_core.runtime.loading import load_any


def divergence(teacher: torch.nn.Module, student: torch.nn.Module, windows: torch.Tensor) -> dict[str, float]:
    """KL(teacher || student) per token over windows [S, T] int64: mean, first position, rest, max."""
    with torch.no_grad():
        log_p = torch.log_softmax(teacher(windows).logits.float(), -1)
        log_q = torch.log_softmax(student(windows).logits.float(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [S, T]
    return {
        "mean": float(kl.mean()),
        "first_position": float(kl[:, 0].mean()),
        "later_positions": float(kl[:, 1:].mean()),
        "max": float(kl.max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", help="packed checkpoint folders")
    parser.add_argument("--model", required=True, help="the float model they were quantized from")
    parser.add_argument("--calib-samples", type=int, default=32, help="the runs' calibration window count")
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="the runs' calibration seed")
    parser.add_argument("--json", type=Path, required=True)
    args = parse_args(parser, output="json")
    origin = record(args)
    teacher = AutoModelForCausalLM.from_pretrained(str(resolve_model(args.model)), dtype=torch.float32).eval()
    rows: list[dict[str, Any]] = []
    for artifact in args.artifacts:
        student, tokenizer, _ = load_any(artifact)
        student.eval()
        calib = calibration_windows(tokenizer, args.calib_samples, args.calib_len, seed=args.seed)
        texts = {"calibration, held out": calib[-MEASURE_BATCHES:], "evaluation": evaluation_windows(tokenizer)[:4]}
        for text, windows in texts.items():
            kl = divergence(teacher, student, windows)
            rows.append({"artifact": artifact, "text": text, "windows": len(windows), **kl})
    sys.stdout.write("| artifact | text | mean KL | position 0 | positions 1+ | max |\n|---|---|---|---|---|---|\n")
    for r in rows:
        sys.stdout.write(
            f"| {Path(r['artifact']).name} | {r['text']} | {r['mean']:.3f} | {r['first_position']:.3f} "
            f"| {r['later_positions']:.3f} | {r['max']:.2f} |\n"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "provenance": origin}, indent=1))


if __name__ == "__main__":
    main()
