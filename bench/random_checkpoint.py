"""A random-weight checkpoint of a real model's shape, written shard by shard (never for quality).

Memory and time of streaming depend on shapes, not values: a Llama-3.1-8B-shaped checkpoint
(its real config, bf16 weights drawn at random, 16 GB on disk) measures what a user's 8B model
would cost, on a machine with less memory than the model in float32. The writer holds one shard
at a time (``--shard-gb``), so it runs where the model would not fit either. The tokenizer is the
bundled model's (its ids fit any vocabulary this large).

    python bench/random_checkpoint.py --shape llama-3.1-8b --out /tmp/llama8b
    python bench/random_checkpoint.py --shape llama-1024 --blocks 16 --out /tmp/llama1024x16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

SHAPES: dict[str, dict[str, Any]] = {
    # https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json (as published)
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    },
    # a 1024-wide LLaMA (SmolLM2-360M-like widths) for the depth benchmark: --blocks sets its depth
    "llama-1024": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 4,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    },
}


def tensor_shapes(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every stored tensor of a LLaMA-architecture checkpoint, in file order."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names += [
            (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (p + "self_attn.k_proj.weight", (kv * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv * head_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    names.append(("model.norm.weight", (hidden,)))
    if not config.get("tie_word_embeddings"):
        names.append(("lm_head.weight", (vocab, hidden)))
    return names


def write_checkpoint(config: dict[str, Any], out: Path, *, shard_bytes: float, seed: int = 0) -> dict[str, Any]:
    """Write ``config.json``, bf16 shards and their index to ``out``; returns the index."""
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name, shape in tensor_shapes(config):
        nbytes = 2 * torch.Size(shape).numel()
        if sizes[-1] and sizes[-1] + nbytes > shard_bytes:
            shards.append({})
            sizes.append(0)
        sizes[-1] += nbytes
        shards[-1][name] = torch.Tensor()  # placeholder: values are drawn when the shard is written
    weight_map: dict[str, str] = {}
    shapes = dict(tensor_shapes(config))
    for index, shard in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in shard:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:  # 0.02: the usual initialiser's scale, so activations stay finite through the blocks
                tensors[name] = (torch.randn(shapes[name], generator=gen) * 0.02).to(torch.bfloat16)
            weight_map[name] = file
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        del tensors
    total = sum(sizes)
    index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return index_doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--blocks", type=int, help="decoder blocks (default: the shape's own)")
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = dict(SHAPES[args.shape])
    if args.blocks:
        config["num_hidden_layers"] = args.blocks
    out = Path(args.out)
    index = write_checkpoint(config, out, shard_bytes=args.shard_gb * 2**30, seed=args.seed)
    from rsavq_core.models.resolve import load_tokenizer, resolve_model

    tokenizer: Any = load_tokenizer(resolve_model("smollm2-135m"))
    tokenizer.save_pretrained(out)
    files = len(set(index["weight_map"].values()))
    sys.stdout.write(f"{out}: {index['metadata']['total_size'] / 2**30:.2f} GiB in {files} shards\n")


if __name__ == "__main__":
    main()
