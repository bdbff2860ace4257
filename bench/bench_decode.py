"""End-to-end decode tokens/s at batch 1: a 2-bit VQ model against the same model in float.

The VPTQ/AQLM protocol: a 1-token prompt, ``--new-tokens`` (256) greedy tokens, batch 1, through
transformers' ``generate`` with its KV cache; the first run (warm-up, kernel compilation) is not
timed, the median of ``--repeats`` is reported. Two models:

* ``--model smollm2-135m`` (or any local/cached id): the real architecture and non-linear
  weights, every decoder linear swapped for a random 2-bit VQ layer (same shapes and bytes as a
  real RSAVQ layer: timing only) or, with ``--artifact DIR``, a real packed checkpoint.
* ``--shape llama-7b``: a LLaMA-7B config with random weights (CUDA; ~14 GB in fp16).

On CPU the quantized model runs the reference path (the weight is dequantized once and cached),
so this is what users without a GPU should expect. ``--cuda-graphs`` (CUDA) uses a static KV
cache and ``torch.compile(mode="reduce-overhead")``.

    OMP_NUM_THREADS=2 python bench/bench_decode.py --model smollm2-135m --device cpu --new-tokens 64
    python bench/bench_decode.py --shape llama-7b --device cuda --cuda-graphs
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from random_vq import quantize_randomly

from rsavq_core.runs.replay import parse_args, record


def llama_7b(device: str, dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()


def tokens_per_second(model: nn.Module, new_tokens: int, repeats: int, cuda_graphs: bool) -> list[float]:
    device = next(iter(model.parameters())).device
    ids = torch.tensor([[1]], device=device)
    kwargs: dict[str, Any] = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": 0,
        "temperature": None,
        "top_p": None,
        "top_k": None,
    }
    if cuda_graphs:
        kwargs["cache_implementation"] = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
    rates = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first run warms up (and compiles)
            rates.append((out.shape[1] - 1) / (time.perf_counter() - start))
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model id or local folder (real architecture)")
    parser.add_argument("--shape", choices=["llama-7b"], help="a random-weight model of this shape")
    parser.add_argument("--artifact", help="a packed checkpoint to time instead of random codes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parse_args(parser, output="json")
    origin = record(args)
    if not (args.model or args.shape):
        parser.error("give --model or --shape")
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    if args.shape:
        fp = llama_7b(args.device, dtype)
    else:
        from rsavq_core.models.resolve import load_model

        fp, _, _ = load_model(args.model)
        fp = fp.to(args.device, dtype).eval()
    if args.artifact:
        from rsavq_core.runtime import load_quantized_model

        quant, _, _ = load_quantized_model(args.artifact, dtype=dtype, device=args.device)
    else:
        quant = quantize_randomly(copy.deepcopy(fp), args.bits, args.device)
    results = {}
    for label, model in (("float", fp), (f"vq-{args.bits}bit", quant)):
        rates = tokens_per_second(model, args.new_tokens, args.repeats, args.cuda_graphs)
        results[label] = {"tokens_per_s": statistics.median(rates), "runs": rates}
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{torch.get_num_threads()}"
    name = args.shape or args.model
    out = sys.stdout.write
    mode = "CUDA graphs" if args.cuda_graphs else "eager"
    out(
        f"decode, batch 1, 1-token prompt, {args.new_tokens} new tokens, {name}, {device_name}, {mode}\n\n"
        f"| model | tokens/s (median of {args.repeats}) |\n|---|---|\n"
    )
    for label, r in results.items():
        out(f"| {label} | {r['tokens_per_s']:.1f} |\n")
    speedup = results[f"vq-{args.bits}bit"]["tokens_per_s"] / results["float"]["tokens_per_s"]
    out(f"\nquantized / float: {speedup:.2f}x\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "model": name,
                    "device": device_name,
                    "dtype": str(dtype),
                    "new_tokens": args.new_tokens,
                    "cuda_graphs": args.cuda_graphs,
                    "artifact": args.artifact,
                    "results": results,
                    "speedup": speedup,
                    "provenance": origin,
                },
                indent=1,
            )
        )
        out(f"wrote {args.json}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
