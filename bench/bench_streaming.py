"""Streaming at scale: peak memory, seconds per block and the memory estimate against the peak.

Each row runs in a fresh process (its peak RSS is its own) and records the pre-flight estimate
beside the measured peak. The random-weight checkpoints come from ``bench/random_checkpoint.py``
(memory and time depend on shapes, not values; their perplexities mean nothing).

    python bench/random_checkpoint.py --shape llama-3.1-8b --out /tmp/llama8b
    python bench/random_checkpoint.py --shape llama-1024 --blocks 4 --out /tmp/llama1024x4
    python bench/random_checkpoint.py --shape llama-1024 --blocks 16 --out /tmp/llama1024x16
    python bench/bench_streaming.py --rows bundled-gptq bundled-gptq-whole depth-4 depth-16 8b-gptq 8b-default \\
        --model-8b /tmp/llama8b --model-1024 /tmp/llama1024x{blocks} --out bench/results/streaming.json

Rows: ``bundled-gptq`` (-``whole``): the bundled model, GPTQ 4-bit g128 on 8 x 256 windows,
streamed (loaded whole), with the artifact's sha256; ``bundled-default``: the default 2-bit run
streamed (its whole-model peak is in ``bench/results/defaults.json``); ``depth-4`` / ``depth-16``:
the fast preset on 1024-wide random LLaMAs of 4 and 16 blocks (the default activation budget, two
boundaries: the others wait on disk); ``8b-gptq``: the Llama-3.1-8B-shaped
checkpoint, GPTQ 4-bit g128 on 8 x 256 windows, written out; ``8b-default``: the default method
on its first block (``--blocks``), projected to the whole model; ``8b-gptq-blocks``: the GPTQ row
on its first blocks, projected likewise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

H100_FP32_TFLOPS = 67.0  # H100 SXM, dense fp32 without tensor cores (NVIDIA's datasheet)


def placement_of(spec: dict[str, Any]) -> Any:
    """The row's placement: the settings' (``RSAVQ_ACTIVATION_MEMORY_GB`` and friends), streamed or not."""
    from rsavq_core.pipeline.placement import Placement

    return Placement.from_settings(stream=spec["stream"])


def run_quantize(spec: dict[str, Any], cfg_json: str) -> dict[str, Any]:
    """One quantization in this (fresh) process: timings, peak RSS, the artifact's sha256."""
    from rsavq_core.config.quant_config import QuantConfig
    from rsavq_core.pipeline.quantize import peak_rss_gb, quantize_model

    cfg = QuantConfig.from_dict(json.loads(cfg_json))
    out = spec["out"]
    started = time.perf_counter()
    result = quantize_model(
        spec["model"], cfg, out_dir=Path(out) if out else None, placement=placement_of(spec), blocks=spec.get("blocks")
    )
    row: dict[str, Any] = {
        "seconds": time.perf_counter() - started,
        "timings": result.timings,
        "peak_rss_gb": peak_rss_gb(),
        "blocks_quantized": len({name.rsplit(".", 2)[0] for name in result.layers}) if result.layers else 0,
        "layers": len(result.layers),
    }
    if out:
        packed = Path(out) / "rsavq.safetensors"
        digest = hashlib.sha256()
        with packed.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
        row["sha256"] = digest.hexdigest()
        row["artifact_gb"] = packed.stat().st_size / 2**30
    return row


def plan(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Row label -> (model, method, knobs, stream, out, blocks)."""
    gptq = {"method": "gptq", "bits": 4, "group_size": 128, "calib_samples": 8, "calib_len": 256}
    fast = {"method": "rsavq", "bits": 2, "preset": "fast"}
    return {
        "bundled-gptq": {"model": "smollm2-135m", **gptq, "stream": True, "out": f"{args.scratch}/bundled-gptq"},
        "bundled-gptq-whole": {
            "model": "smollm2-135m",
            **gptq,
            "stream": False,
            "out": f"{args.scratch}/bundled-gptq-whole",
        },
        "bundled-default": {"model": "smollm2-135m", "method": "rsavq", "bits": 2, "stream": True, "out": None},
        "depth-4": {"model": args.model_1024.format(blocks=4), **fast, "stream": True, "out": None},
        "depth-16": {"model": args.model_1024.format(blocks=16), **fast, "stream": True, "out": None},
        "8b-gptq": {"model": args.model_8b, **gptq, "stream": True, "out": f"{args.scratch}/8b-gptq"},
        # the same on its first blocks (--blocks): peak memory and seconds per block where the whole
        # model takes hours on this machine
        "8b-gptq-blocks": {"model": args.model_8b, **gptq, "stream": True, "out": None, "blocks": args.blocks},
        "8b-default": {
            "model": args.model_8b,
            "method": "rsavq",
            "bits": 2,
            "calib_samples": 8,
            "calib_len": 256,
            "stream": True,
            "out": None,
            "blocks": args.blocks,
        },
    }


def measure(label: str, spec: dict[str, Any]) -> dict[str, Any]:
    from rsavq_core.config.quant_config import QuantConfig
    from rsavq_core.models.memory import GIB, block_shapes, estimate_job_memory
    from rsavq_core.models.resolve import resolve_model
    from rsavq_core.runs.summaries import in_fresh_process

    placing = ("model", "method", "stream", "out", "blocks", "preset")
    knobs = {k: v for k, v in spec.items() if k not in placing}
    cfg = QuantConfig.for_method(spec["method"], preset=spec.get("preset"), **knobs)
    folder = resolve_model(spec["model"])
    placement = placement_of(spec)
    estimate = estimate_job_memory(
        folder, cfg, streamed=spec["stream"], activation_budget=placement.activation_budget_bytes
    )
    row = in_fresh_process(label, run_quantize, spec, cfg.to_json())
    n_blocks = len(block_shapes(folder).parameters)
    per_block = (row["timings"].get("quantize", 0.0) + row["timings"].get("shared codebooks", 0.0)) / max(
        row["blocks_quantized"], 1
    )
    row.update(
        label=label,
        model=spec["model"],
        config=cfg.to_dict(),
        streamed=spec["stream"],
        activation_budget_gb=None if (budget := placement.activation_budget_bytes) is None else budget / GIB,
        blocks_in_model=n_blocks,
        quantize_seconds_per_block=per_block,
        estimate_gb=estimate.total / GIB,
        estimate_terms_gb={k: v / GIB for k, v in estimate.terms.items()},
        peak_over_estimate=row["peak_rss_gb"] / (estimate.total / GIB),
    )
    return row


def project(row: dict[str, Any], gflops: float, gradients: bool) -> None:
    """Whole-model seconds from a block-limited row: quantization per block; calibration once when
    gradients came down through every block already, per block when only the first blocks' Hessians
    were computed; and the same scaled by this CPU's measured fp32 rate against an H100's
    (compute-bound assumption)."""
    statistics = row["timings"].get("statistics", 0.0)
    blocks, quantized = row["blocks_in_model"], max(row["blocks_quantized"], 1)
    calibration = statistics if gradients else statistics / quantized * blocks
    whole = row["timings"].get("load", 0.0) + calibration + row["quantize_seconds_per_block"] * blocks
    row["projected_whole_model_s_this_cpu"] = whole
    row["projected_whole_model_s_h100_fp32"] = whole * gflops / (H100_FP32_TFLOPS * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", required=True)
    parser.add_argument("--model-8b", default="/tmp/llama8b")
    parser.add_argument("--model-1024", default="/tmp/llama1024x{blocks}")
    parser.add_argument("--blocks", type=int, default=1, help="blocks of the 8b-default and 8b-gptq-blocks rows")
    parser.add_argument("--scratch", default="/tmp/bench-streaming", help="where artifacts are written")
    parser.add_argument("--out", default="bench/results/streaming.json")
    args = parser.parse_args()
    from rsavq_core.config.quant_config import QuantConfig
    from rsavq_core.runs.provenance import provenance
    from rsavq_core.runs.replay import recorded_args

    specs = plan(args)
    unknown = [r for r in args.rows if r not in specs]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {sorted(specs)}")
    origin = {**provenance(), "args": recorded_args(args)}
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {"rows": {}}
    for label in args.rows:
        row = measure(label, specs[label])
        if specs[label].get("blocks"):
            gradients = QuantConfig.from_dict(row["config"]).needs_gradients()
            project(row, float(origin["machine"].get("fp32_gflops") or 0.0), gradients)
        row["provenance"] = origin
        previous["rows"][label] = row
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(previous, indent=1, default=str) + "\n")  # each row as it lands
        sys.stdout.write(
            f"{label:20s} peak {row['peak_rss_gb']:6.2f} GiB  estimate {row['estimate_gb']:6.2f} GiB "
            f"(peak/estimate {row['peak_over_estimate']:.2f})  {row['seconds']:8.0f} s  "
            f"{row['quantize_seconds_per_block']:7.1f} s/block  {row.get('sha256', '')[:16]}\n"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
