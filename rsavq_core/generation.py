"""Text generation from a float or quantized model through transformers' ``generate`` (KV cache)."""

from __future__ import annotations

import torch
from torch import nn

from rsavq_core.errors import ConfigError


def generate_text(model: nn.Module, tokenizer: object, prompt: str, *, max_new_tokens: int = 32,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> str:
    """The continuation of ``prompt`` (greedy when temperature == 0, else nucleus sampling)."""
    if max_new_tokens < 1:
        raise ConfigError("max_new_tokens must be at least 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError("temperature must be >= 0 and top_p in (0, 1]")
    # Raw text, no special tokens: the bundled model's BOS is a chat token (assets.md).
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)  # type: ignore[operator]
    if enc["input_ids"].shape[1] == 0:
        raise ConfigError("the prompt is empty")
    torch.manual_seed(seed)
    sampling = temperature > 0
    kwargs = {"do_sample": sampling, "max_new_tokens": max_new_tokens,
              "pad_token_id": getattr(tokenizer, "pad_token_id", None) or getattr(tokenizer, "eos_token_id", None)}
    if sampling:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        out = model.generate(**enc, **kwargs)  # type: ignore[operator]
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)  # type: ignore[attr-defined]
