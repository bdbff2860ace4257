"""Where the fused GEMV stops beating dequantize + GEMM, on this GPU (CUDA only).

For each LLaMA-7B shape and token count 1..16: the GEMV's time and dequantize-then-``F.linear``'s
time, both on the same random 2-bit layer. The crossover (the largest token count at which the
GEMV wins on every shape) is written to ``kernels/dispatch_thresholds.json`` under this GPU's
name, which ``kernels.dispatch`` reads; the table says what was measured.

    python bench/bench_dispatch.py [--bits 2] [--json bench/results/dispatch.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from random_vq import random_vq_layer

from rsavq_core.runs.replay import parse_args, record

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
TOKENS = [1, 2, 3, 4, 6, 8, 12, 16]


def measure(shape: tuple[int, int], bits: int) -> list[dict[str, Any]]:
    import triton.testing

    from kernels.vq_triton import vq_dequantize, vq_gemv
    from rsavq_core.formats.vq import packed_from_layer

    packed = packed_from_layer(random_vq_layer(*shape, bits, device="cuda"), "cuda")
    rows = []
    for tokens in TOKENS:
        x = torch.randn(tokens, shape[1], device="cuda", dtype=torch.float16)
        gemv = triton.testing.do_bench(lambda x=x: vq_gemv(x, packed), return_mode="median")
        gemm = triton.testing.do_bench(
            lambda x=x: F.linear(x, vq_dequantize(packed, torch.float16)), return_mode="median"
        )
        rows.append({"shape": list(shape), "tokens": tokens, "gemv_ms": gemv, "dequant_gemm_ms": gemm})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("bench/results/dispatch.json"))
    parser.add_argument("--no-write-thresholds", action="store_true")
    args = parse_args(parser, output="json")
    if not torch.cuda.is_available():
        sys.stdout.write("no CUDA GPU here: nothing to measure (dispatch uses its documented default)\n")
        return 0
    rows = [r for shape in SHAPES for r in measure(shape, args.bits)]
    wins = [t for t in TOKENS if all(r["gemv_ms"] <= r["dequant_gemm_ms"] for r in rows if r["tokens"] == t)]
    crossover = max((t for t in wins if all(w in wins for w in TOKENS if w <= t)), default=0)
    gpu = torch.cuda.get_device_name()
    out = sys.stdout.write
    out(
        f"GEMV vs dequantize + GEMM, {args.bits}-bit, {gpu}\n\n| shape | tokens | GEMV us | dequant+GEMM us |\n"
        "|---|---|---|---|\n"
    )
    for r in rows:
        out(
            f"| {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} | {r['gemv_ms'] * 1e3:.1f} | "
            f"{r['dequant_gemm_ms'] * 1e3:.1f} |\n"
        )
    out(f"\nGEMV wins up to {crossover} tokens on every shape\n")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {"gpu": gpu, "bits": args.bits, "rows": rows, "gemv_max_tokens": crossover, "provenance": record(args)},
            indent=1,
        )
    )
    if not args.no_write_thresholds:
        from kernels.dispatch import THRESHOLDS_FILE

        table = json.loads(THRESHOLDS_FILE.read_text()) if THRESHOLDS_FILE.is_file() else {}
        table[gpu] = {"gemv_max_tokens": crossover, "bits": args.bits, "torch": torch.__version__}
        THRESHOLDS_FILE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        out(f"wrote {THRESHOLDS_FILE} [{gpu!r}]\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
