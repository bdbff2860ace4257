"""Effective bits per weight, counted from what the packed checkpoint actually stores.

Conventions (decided here, used by every report; each format counts its own layers):

* ``index_bits`` are the bits of the codes that encode real weights: ``M * |G_g| * b_g`` summed
  over groups for VQ (spec §9.1), ``bits * M * N`` for scalar layers.
* ``padding_bits`` are stored bits that encode nothing: the codes of the zero rows added when
  ``M % vector_len != 0`` and the zero tail of each int32 word stream.
* ``codebook_bits``, ``perm_bits`` and ``scale_bits`` (scales and zero points) are the side
  information, in the dtype it is stored in (fp16 codebooks/scales; int16 or int32 perm).
* ``bias_bits`` are reported but **not** part of ``total_bits`` / ``bpw``: the FP16 model stores
  the same bias, so it is not a cost of quantizing the weight matrix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from rsavq_core.checkpoint.manifest import layer_aliases
from rsavq_core.formats.base import FP16_BITS, BitCount, QuantizedLayer
from rsavq_core.formats.registry import format_of


def layer_bits(layer: QuantizedLayer) -> BitCount:
    """The stored bits of one quantized layer, as the packed checkpoint writes it."""
    return format_of(layer).stored_bits(layer)


def model_bits(layers: Mapping[str, QuantizedLayer], model: nn.Module) -> dict[str, Any]:
    """Bits per weight of a model whose ``layers`` are quantized.

    Returns a dict with
      * ``quantized``: BitCount dict summed over the quantized layers (bpw over their weights);
      * ``all_bpw``: bits of every stored parameter over the number of parameters, counting
        non-quantized parameters at 16 bits (fp16, as the packed checkpoint stores them) and the
        quantized layers' biases at 16 bits too;
      * ``n_params``: the parameter count behind ``all_bpw``;
      * ``layers``: {name: bpw} per quantized layer (without the codebooks it shares with other
        layers, which ``quantized`` counts once).
    Parameters of ``model`` under a quantized layer's name are replaced by that layer's count,
    so the model may be the FP original or one with QuantLinear modules swapped in.
    """
    total = BitCount(weights=0)
    per_layer: dict[str, float] = {}
    shared: dict[str, int] = {}  # tensors several layers share: stored, and so counted, once
    aliases = layer_aliases(layers)  # a layer serving under two names (an embedding, its tied head): stored once
    n_bias = 0
    for name, layer in layers.items():
        count = layer_bits(layer)
        per_layer[name] = count.bpw
        if name not in aliases:
            total = total + count
            n_bias += layer.bias.numel() if layer.bias is not None else 0
        for key, tensor in format_of(layer).shared_tensors(layer).items():
            shared[key] = tensor.numel() * tensor.element_size() * 8
    total = total + BitCount(weights=0, codebook_bits=sum(shared.values()))
    prefixes = tuple(f"{name}." for name in layers)
    # named_parameters() yields tied parameters once, which matches the deduplicated storage.
    other_params = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(prefixes))
    n_params = total.weights + n_bias + other_params
    all_bits = total.total_bits + total.bias_bits + other_params * FP16_BITS
    return {
        "quantized": total.to_dict(),
        "all_bpw": all_bits / n_params if n_params else math.nan,
        "n_params": n_params,
        "layers": per_layer,
    }
