"""Tiny random-weight models of the decoder architectures users bring, built from transformers configs.

No hub: each is a config of its model type with a few small dimensions, random weights (seeded),
and the bundled tokenizer's vocabulary, saved as a local checkpoint folder. Small enough that the
default method quantizes one in seconds on 2 cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 4, 2, 16

# model type -> the config fields of its tiny version beyond the shared ones (``_shared``)
TINY: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": HEAD_DIM},
    "gemma2": {"head_dim": HEAD_DIM},
    "gemma3_text": {"head_dim": HEAD_DIM},
    "phi3": {},  # fused qkv_proj and gate_up_proj, quantized as the nn.Linear layers they are
    "olmo2": {},
    "gpt_neox": {},  # fused query_key_value; parallel attention and MLP
    # OPT runs its MLP on the tokens flattened to [B·T, H]; no key/value head grouping
    "opt": {"ffn_dim": INTERMEDIATE, "word_embed_proj_dim": HIDDEN, "intermediate_size": None},
    # mixture-of-experts: experts stored as fused 3-D parameters (transformers 5), not nn.Linear
    "qwen3_moe": {"head_dim": HEAD_DIM, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
}
DENSE = [t for t in TINY if t not in ("qwen3_moe", "mixtral")]
MOE = ["qwen3_moe", "mixtral"]


def _shared(vocab: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": 2,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 256,
    }


def build_tiny(model_type: str, tokenizer: Any, seed: int = 0) -> Any:
    """A randomly initialised 2-block ``model_type`` model (eval mode) with ``tokenizer``'s vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {**_shared(len(tokenizer)), **TINY[model_type]}
    fields = {k: v for k, v in fields.items() if v is not None}
    if model_type == "opt":
        fields.pop("num_key_value_heads")
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **fields)
    return AutoModelForCausalLM.from_config(config).eval()


def save_tiny(model_type: str, tokenizer: Any, folder: Path) -> Path:
    """The tiny ``model_type`` model and ``tokenizer`` written to ``folder`` (safetensors); returns it."""
    model = build_tiny(model_type, tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
