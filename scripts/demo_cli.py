"""The main job end to end on the command-line path: quantize the bundled model at 3 bits, compare
FP and quantized perplexity (wiki-holdout-512), report the effective bits per weight, generate text.

Usage: python scripts/demo_cli.py [--model smollm2-135m] [--bits 3] [--out runs/demo-3bit]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from rsavq_core.checkpoint.bitcount import model_bits
from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.evaluation import perplexity
from rsavq_core.pipeline.quantize import quantize_model, save_result
from rsavq_core.runtime import load_quantized_model
from rsavq_core.runtime.generation import generate_text
from service.cli.progress import StageBars


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bits", type=float, default=3.0)
    parser.add_argument("--out", default="runs/demo-3bit")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--calib-samples", type=int, help="calibration windows (default: QuantConfig's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    say = sys.stdout.write

    bar = StageBars()
    overrides = {"calib_samples": args.calib_samples} if args.calib_samples else {}
    cfg = QuantConfig.for_method("rsavq", bits=args.bits, **overrides)
    say(f"Quantizing {args.model} with RSAVQ at {args.bits:g} bits (statistics are cached after the first run)\n")
    result = quantize_model(args.model, cfg, progress=bar)
    bar.close()
    fp = perplexity(result.model, result.tokenizer, progress=lambda _, d, t: bar("FP perplexity", d, t))
    bar.close()
    out = save_result(result, Path(args.out))

    model, tokenizer, _ = load_quantized_model(out)  # evaluate what was written, not what is in memory
    q = perplexity(model, tokenizer, progress=lambda _, d, t: bar("quantized perplexity", d, t))
    bar.close()
    bits = model_bits(result.layers, result.model)
    t0 = time.perf_counter()
    text_fp = generate_text(result.model, result.tokenizer, args.prompt, max_new_tokens=24)
    text_q = generate_text(model, tokenizer, args.prompt, max_new_tokens=24)
    gen_s = time.perf_counter() - t0

    say(f"\nprotocol: {fp['protocol']} ({fp['windows']} windows, {fp['tokens']} tokens)\n")
    say(f"FP perplexity:        {fp['ppl']:.2f}\n")
    say(f"RSAVQ perplexity:     {q['ppl']:.2f}\n")
    say(
        f"effective bpw:        {bits['quantized']['bpw']:.4f} (quantized layers), "
        f"{bits['all_bpw']:.3f} (all parameters, the rest fp16)\n"
    )
    stats = "cached" if result.stats_cached else f"{result.timings.get('statistics', 0.0):.0f} s"
    say(f"quantize time:        {result.timings['total']:.0f} s (statistics {stats})\n")
    say(f"peak RSS:             {result.peak_rss_gb:.2f} GB\n")
    say(f"checkpoint:           {out}\n")
    say(f"FP    > {args.prompt}{text_fp}\n")
    say(f"RSAVQ > {args.prompt}{text_q}\n")
    say(
        json.dumps(
            {"fp_ppl": fp["ppl"], "rsavq_ppl": q["ppl"], "bpw": bits["quantized"]["bpw"], "generate_seconds": gen_s}
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
