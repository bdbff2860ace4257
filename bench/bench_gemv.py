"""Batch-1 codebook GEMV against fp16 cuBLAS on LLaMA-7B/8B shapes, at 2, 3 and 4 bits (CUDA only).

For every (shape, bits): the fused Triton GEMV's time (median of ``triton.testing.do_bench``),
the effective GB/s of the bytes it actually reads (packed indices + codebooks + permutation +
x + output), and the speed-up over ``torch.matmul`` with the fp16 weight, measured in the same
run. Random codes (timing only, ``random_vq.py``). Also sweeps a few block sizes and reports the
best next to the default. Goal at 2 bits: >= 3x fp16 (the byte count allows about 7x).

    python bench/bench_gemv.py --json bench/results/gemv_h100.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from random_vq import random_vq_layer

from rsavq_core.runs.replay import parse_args, record

# (out, in): q/k/v/o, LLaMA-7B up/gate, LLaMA-7B down, LLaMA-3-8B up/gate.
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]
BLOCKS = [(32, 32, 128), (64, 32, 128), (64, 64, 256), (128, 32, 128), (128, 64, 256), (32, 64, 64)]


def bytes_read(packed: Any, n: int, m: int) -> int:
    return packed.words.numel() * 4 + packed.codebooks.numel() * 2 + packed.perm.numel() * 4 + n * 2 + m * 4


def run(shape: tuple[int, int], bits: int, sweep: bool) -> dict[str, Any]:
    import triton.testing

    from kernels.vq_triton import vq_gemv
    from rsavq_core.formats.vq import packed_from_layer

    m, n = shape
    layer = random_vq_layer(m, n, bits, device="cuda")
    x = torch.randn(1, n, device="cuda", dtype=torch.float16)
    weight = torch.randn(m, n, device="cuda", dtype=torch.float16) * 0.02
    fp16_ms = triton.testing.do_bench(lambda: torch.matmul(x, weight.T), return_mode="median")
    results = []
    for block_m, block_k, tile_cols in BLOCKS if sweep else BLOCKS[1:2]:
        packed = packed_from_layer(layer, "cuda", tile_cols=tile_cols)
        ms = triton.testing.do_bench(
            lambda p=packed, bm=block_m, bk=block_k: vq_gemv(x, p, bm, bk), return_mode="median"
        )
        results.append(
            {
                "block_m": block_m,
                "block_k": block_k,
                "tile_cols": tile_cols,
                "ms": ms,
                "gbps": bytes_read(packed, n, m) / ms / 1e6,
            }
        )
    default, best = results[0] if not sweep else results[1], min(results, key=lambda r: r["ms"])
    return {
        "shape": list(shape),
        "bits": bits,
        "fp16_ms": fp16_ms,
        "fp16_gbps": (m * n + n + m) * 2 / fp16_ms / 1e6,
        "default": default,
        "best": best,
        "speedup_default": fp16_ms / default["ms"],
        "speedup_best": fp16_ms / best["ms"],
        "configs": results,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, action="append", help="repeatable (default 2 3 4)")
    parser.add_argument("--no-sweep", action="store_true", help="the default block sizes only")
    parser.add_argument("--json", type=Path, default=Path("bench/results/gemv.json"))
    args = parse_args(parser, output="json")
    if not torch.cuda.is_available():
        sys.stdout.write(
            "no CUDA GPU here: the GEMV benchmark measures nothing on CPU (the kernels' CPU "
            "correctness is checked by `pytest -m interpret`)\n"
        )
        return 0
    rows = [run(shape, bits, not args.no_sweep) for bits, shape in itertools.product(args.bits or [2, 3, 4], SHAPES)]
    gpu = torch.cuda.get_device_name()
    out = sys.stdout.write
    out(f"GEMV, batch 1, {gpu}, torch {torch.__version__}\n\n")
    out(
        "| shape (out x in) | bits | fp16 us | fp16 GB/s | VQ us (default) | VQ us (best) | VQ GB/s (best) "
        "| speed-up (best) | best blocks |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    for r in rows:
        b = r["best"]
        out(
            f"| {r['shape'][0]}x{r['shape'][1]} | {r['bits']} | {r['fp16_ms'] * 1e3:.1f} | {r['fp16_gbps']:.0f} | "
            f"{r['default']['ms'] * 1e3:.1f} | {b['ms'] * 1e3:.1f} | {b['gbps']:.0f} | {r['speedup_best']:.2f}x | "
            f"{b['block_m']}/{b['block_k']}/{b['tile_cols']} |\n"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"gpu": gpu, "torch": torch.__version__, "rows": rows, "provenance": record(args)}, indent=1)
    )
    out(f"\nwrote {args.json}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
