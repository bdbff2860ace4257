"""Time one LLaMA-7B-shaped decoder block (random weights) and project the GPU-hours of a 7B run.

Timing only: weights, activations, gradients and statistics are random; nothing is evaluated.
Measured on the chosen device, then projected to ``--blocks`` (32) blocks and ``--samples``
calibration sequences of ``--seq-len`` tokens:

* stats    = samples × (blocks × accumulation of one sequence in one block + model fwd/bwd estimate)
* quantize = blocks × Σ_layers quantize time of that layer

The model forward/backward is not run; it is estimated as FLOPs / measured matmul throughput
(bf16 on CUDA, fp32 on CPU), which is optimistic (peak-like matmul efficiency). The paper reports
1.2 A100-hours for LLaMA-7B; the goal is < 0.5 H100-hours. ``--scale 16`` divides every layer
dimension by 16 (256/688) for a CPU smoke run: its projection is for that small model, not 7B.

    OMP_NUM_THREADS=1 python bench/bench_quantize_layers.py --device cpu --scale 16 --samples 2 --seq-len 128
    python bench/bench_quantize_layers.py --bits 2 --bits 3 --compensate --json runs/bench_7b.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from rsavq_core.calibration.statistics import LayerStats, _Accumulator
from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.methods.registry import get_method, method_names
from rsavq_core.runs import replay

PAPER_A100_HOURS = 1.2
D_MODEL, D_FFN, VOCAB = 4096, 11008, 32000
# (name, out M, in N, input tensor it reads): q/k/v and gate/up share one input (and one xᵀx),
# exactly as calibration.block_statistics computes the Hessian once per distinct input.
LAYERS_7B = [
    ("q_proj", D_MODEL, D_MODEL, "attn_in"),
    ("k_proj", D_MODEL, D_MODEL, "attn_in"),
    ("v_proj", D_MODEL, D_MODEL, "attn_in"),
    ("o_proj", D_MODEL, D_MODEL, "attn_out"),
    ("gate_proj", D_FFN, D_MODEL, "mlp_in"),
    ("up_proj", D_FFN, D_MODEL, "mlp_in"),
    ("down_proj", D_MODEL, D_FFN, "mlp_act"),
]
Layer = tuple[str, int, int, str]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn`` with the device queue drained before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def block_layers(scale: float) -> list[Layer]:
    return [(name, max(8, round(m / scale)), max(8, round(n / scale)), src) for name, m, n, src in LAYERS_7B]


def time_accumulation(
    layers: list[Layer], fisher: str, want_grads: bool, seq_len: int, repeats: int, device: torch.device
) -> list[float]:
    """Seconds to add ONE sequence's x [1, T, N] / δ [1, T, M] to the 7 accumulators of a block."""
    widths = {src: n for _, _, n, src in layers}
    xs = {src: torch.randn(1, seq_len, n, device=device) for src, n in widths.items()}
    deltas = {name: torch.randn(1, seq_len, m, device=device) * 1e-4 for name, m, _, _ in layers}
    accs = {name: _Accumulator(fisher, want_grads) for name, _, _, _ in layers}

    def one_sequence() -> None:
        hessians: dict[str, torch.Tensor] = {}
        for name, _, n, src in layers:
            if src not in hessians:
                flat = xs[src].reshape(-1, n).float()
                hessians[src] = flat.T @ flat
            accs[name].add_inputs(xs[src], hessians[src])
            if want_grads:
                accs[name].add_gradients(xs[src], deltas[name])

    timed(one_sequence, device)  # warm-up; also allocates the running sums (first add clones)
    return [timed(one_sequence, device) for _ in range(repeats)]


def fake_stats(m: int, n: int, seq_len: int, samples: int, device: torch.device) -> LayerStats:
    """Well-conditioned random statistics: low-rank-plus-identity Fisher factors, correlated XᵀX."""

    def factor(size: int) -> torch.Tensor:
        g = torch.randn(size, max(4, size // 16), device=device)
        return g @ g.T / g.shape[1] + torch.eye(size, device=device)

    fo, fi = factor(m), factor(n)
    x = torch.randn(2 * n, n, device=device)
    x += 0.5 * torch.randn(2 * n, 16, device=device) @ torch.randn(16, n, device=device) / 4.0
    x *= 0.5 + torch.rand(n, device=device)  # uneven channel scales, like real activations
    return LayerStats(
        grad_mean=torch.randn(m, n, device=device) * 1e-3,
        fisher_out=fo,
        fisher_in=fi,
        tau=float(fo.trace()),
        hessian=x.T @ x / x.shape[0],
        n_samples=samples,
        n_tokens=samples * seq_len,
        hessian_first=x[:16].T @ x[:16] / 16,  # stands in for the windows' first tokens
    )


def quantize_once(weight: torch.Tensor, stats: LayerStats, cfg: QuantConfig) -> None:
    get_method(cfg.method).quantize_layer(weight, None, stats, cfg)


def time_quantize(
    layers: list[Layer], cfg: QuantConfig, seq_len: int, samples: int, device: torch.device
) -> dict[str, float]:
    """Seconds of one quantization of each layer (statistics built outside the timed region)."""
    # Warm-up at the first layer's shape: kernels, cuBLAS/cuSOLVER handles, allocator pools.
    _, m0, n0, _ = layers[0]
    warm = fake_stats(m0, n0, seq_len, samples, device)
    quantize_once(torch.randn(m0, n0, device=device) * 0.02, warm, cfg)
    out: dict[str, float] = {}
    for name, m, n, _ in layers:
        weight = torch.randn(m, n, device=device) * 0.02
        stats = fake_stats(m, n, seq_len, samples, device)
        out[name] = timed(lambda w=weight, s=stats: quantize_once(w, s, cfg), device)  # type: ignore[misc]
        del weight, stats
    return out


def matmul_tflops(size: int, dtype: torch.dtype, device: torch.device, reps: int = 10) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timed(lambda: a @ b, device)
    seconds = timed(lambda: [a @ b for _ in range(reps)], device)
    return 2 * size**3 * reps / seconds / 1e12


def model_flops(layers: list[Layer], blocks: int, seq_len: int, want_grads: bool) -> dict[str, float]:
    """FLOPs of the model passes of ONE calibration sequence in the block-wise algorithm.

    Pass 1: forward of the whole model (+ backward through the head only). Pass 2, per block:
    re-forward, and with gradients a backward to the block input through activations only
    (weights are frozen: ≈ the forward's matmul FLOPs, no weight-gradient matmuls). Linear FLOPs
    2·params·T per forward; attention scores 4·T²·d per block forward (no causal saving), 8·T²·d
    for its activation backward. With gradients this is ≈ 6·params·T, the usual 2·3·P·T.
    """
    d = layers[0][2]
    p_blocks = blocks * sum(m * n for _, m, n, _ in layers)
    p_head = VOCAB * d
    attn_fwd = blocks * 4 * seq_len**2 * d
    pass1 = 2 * seq_len * (p_blocks + p_head) + attn_fwd + (2 * seq_len * p_head if want_grads else 0)
    reforward = 2 * seq_len * p_blocks + attn_fwd
    backward = (2 * seq_len * p_blocks + 2 * attn_fwd) if want_grads else 0
    return {
        "params_matmul": float(p_blocks + p_head),
        "pass1": float(pass1),
        "reforward": float(reforward),
        "backward": float(backward),
        "total": float(pass1 + reforward + backward),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Time a LLaMA-7B-shaped block; project 7B GPU-hours.")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bits", type=float, action="append", help="repeatable; default 2")
    ap.add_argument("--method", default="rsavq", choices=[m for m in method_names() if m != "rtn"])
    ap.add_argument("--compensate", action="store_true", help="VQ: VPTQ column-wise compensation")
    ap.add_argument(
        "--fisher",
        default="exact",
        choices=["exact", "kfac"],
        help="Fisher form used for the projection (both are timed)",
    )
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=128, help="calibration sequences of the projection")
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--scale", type=float, default=1.0, help="divide layer dims (16: 256/688 smoke run)")
    ap.add_argument("--repeats", type=int, default=3, help="timed accumulation repeats (median used)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write raw timings + projection here")
    return replay.parse_args(ap, argv, output="json")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    origin = replay.record(args)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    out = sys.stdout.write
    layers = block_layers(args.scale)
    overrides: dict[str, Any] = {
        "fisher": args.fisher,
        "calib_samples": args.samples,
        "calib_len": args.seq_len,
        "seed": args.seed,
    }
    if args.compensate:  # a ConfigError for a method without it
        overrides["compensate"] = True
    cfgs = [QuantConfig.for_method(args.method, bits=b, **overrides) for b in (args.bits or [2.0])]
    want_grads = cfgs[0].needs_gradients()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out(
        f"device {name} | torch {torch.__version__} | layers "
        + ", ".join(f"{n} {m}x{k}" for n, m, k, _ in layers)
        + "\n"
    )

    # Without gradients only xᵀx is accumulated (the Fisher form is irrelevant); kmeans without
    # compensation needs no calibration at all, so its stats stage is 0.
    forms = ("exact", "kfac") if want_grads else ("hessian_only",)
    accumulation: dict[str, list[float]] = {}
    for form in forms:
        accumulation[form] = time_accumulation(
            layers, form if want_grads else "exact", want_grads, args.seq_len, args.repeats, device
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    accum_s = statistics.median(accumulation[args.fisher if want_grads else forms[0]])
    mm_size = max(256, round(D_MODEL / args.scale))
    model_dtype = "bfloat16" if device.type == "cuda" else "float32"  # what the model would run in
    tflops = {
        str(dt).removeprefix("torch."): matmul_tflops(mm_size, dt, device)
        for dt in ((torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,))
    }
    flops = model_flops(layers, args.blocks, args.seq_len, want_grads)
    fwdbwd_s = flops["total"] / (tflops[model_dtype] * 1e12)
    calibrate = cfgs[0].needs_calibration()
    stats_s = args.samples * (args.blocks * accum_s + fwdbwd_s) if calibrate else 0.0

    results: list[dict[str, Any]] = []
    for cfg in cfgs:
        per_layer = time_quantize(layers, cfg, args.seq_len, args.samples, device)
        quant_s = args.blocks * sum(per_layer.values())
        rows: list[tuple[str, float, int]] = []
        if calibrate:
            rows += [
                ("stats: accumulate 1 seq x 1 block", accum_s, args.samples * args.blocks),
                (f"stats: model fwd/bwd 1 seq (est., {model_dtype})", fwdbwd_s, args.samples),
            ]
        rows += [(f"quantize {n} (bits {cfg.bits:g})", s, args.blocks) for n, s in per_layer.items()]
        total_h = (stats_s + quant_s) / 3600
        out(
            f"\n{args.method} bits={cfg.bits:g} fisher={args.fisher} "
            f"compensate={cfg.to_dict().get('compensate', False)} "
            f"samples={args.samples} seq_len={args.seq_len} blocks={args.blocks} scale={args.scale:g}\n"
        )
        out(f"{'stage':<46}{'per unit s':>12}{'count':>8}{'proj. hours':>13}\n")
        for stage, sec, count in rows:
            out(f"{stage:<46}{sec:>12.4f}{count:>8d}{sec * count / 3600:>13.4f}\n")
        out(f"{'total stats':<66}{stats_s / 3600:>13.4f}\n{'total quantize':<66}{quant_s / 3600:>13.4f}\n")
        out(f"{'TOTAL projected device-hours':<66}{total_h:>13.4f}\n")
        out(
            f"(paper: {PAPER_A100_HOURS} A100-hours for LLaMA-7B; goal < 0.5 H100-hours"
            + (f"; scale {args.scale:g} run: NOT a 7B projection" if args.scale != 1 else "")
            + ")\n"
        )
        results.append(
            {
                "bits": cfg.bits,
                "config": cfg.to_dict(),
                "quantize_seconds": per_layer,
                "projected_seconds": {"stats": stats_s, "quantize": quant_s},
                "projected_hours": total_h,
            }
        )
    out(
        f"\nmatmul {mm_size}^3 TFLOP/s: "
        + ", ".join(f"{k} {v:.3g}" for k, v in tflops.items())
        + "; accumulation 1 seq x 1 block: "
        + ", ".join(f"{k} {statistics.median(v):.4f}s" for k, v in accumulation.items())
        + f"; fwd/bwd FLOPs/seq {flops['total']:.3e}\n"
    )
    report: dict[str, Any] = {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "args": vars(args),
        "layers": [{"name": n, "out": m, "in": k, "input": s} for n, m, k, s in layers],
        "accumulation_seconds": accumulation,
        "want_grads": want_grads,
        "needs_calibration": calibrate,
        "matmul_tflops": tflops,
        "matmul_size": mm_size,
        "model_dtype": model_dtype,
        "model_flops_per_seq": flops,
        "fwdbwd_seconds_per_seq": fwdbwd_s,
        "paper_a100_hours": PAPER_A100_HOURS,
        "results": results,
        "provenance": origin,
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return report


if __name__ == "__main__":
    main()
