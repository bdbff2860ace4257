"""Effective bits per weight, counted from what the packed checkpoint actually stores.

Conventions (decided here, used by every report):

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

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from rsavq_core.errors import ConfigError, UnsupportedShapeError
from rsavq_core.layers import QuantizedLayer, ScalarLayer, VQLayer
from rsavq_core.packing import WORD_BITS, packed_words

FP16_BITS = 16
# The perm is stored as int16 while N <= 32767 (the rule of the format, spec §11.4), else int32.
PERM_INT16_MAX_N = 32767


def perm_dtype_bits(in_features: int) -> int:
    """Bits per stored permutation entry (see ``PERM_INT16_MAX_N``)."""
    return 16 if in_features <= PERM_INT16_MAX_N else 32


@dataclass(frozen=True)
class BitCount:
    """Stored bits of one or more quantized weight matrices (see the module docstring)."""

    weights: int  # M * N summed over the counted matrices
    index_bits: int = 0
    codebook_bits: int = 0
    perm_bits: int = 0
    scale_bits: int = 0
    bias_bits: int = 0  # reported, excluded from total_bits
    padding_bits: int = 0

    @property
    def total_bits(self) -> int:
        """Every stored bit that represents the weights (bias excluded)."""
        return self.index_bits + self.codebook_bits + self.perm_bits + self.scale_bits + self.padding_bits

    @property
    def bpw(self) -> float:
        return self.total_bits / self.weights if self.weights else 0.0

    def __add__(self, other: BitCount) -> BitCount:
        if not isinstance(other, BitCount):
            return NotImplemented
        return BitCount(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)})

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total_bits": self.total_bits, "bpw": self.bpw}


def _stream_bits(count: int, bits: int) -> tuple[int, int]:
    """(code bits, word-padding bits) of ``count`` codes of ``bits`` bits packed in int32 words."""
    code_bits = count * bits
    return code_bits, packed_words(count, bits) * WORD_BITS - code_bits


def layer_bits(layer: QuantizedLayer) -> BitCount:
    """The stored bits of one quantized layer, as ``save_artifact`` writes it."""
    m, n = layer.out_features, layer.in_features
    bias_bits = layer.bias.numel() * FP16_BITS if layer.bias is not None else 0
    if isinstance(layer, VQLayer):
        d = layer.sub_dim
        index = codebooks = padding = 0
        for g in layer.groups:
            cols = g.stop - g.start
            code_bits, word_pad = _stream_bits(g.indices.numel(), g.bits * d)
            # Codes of real weights: M rows per column; the rest of the stream pads rows up to
            # n_vectors * vector_len.
            real = m * cols * g.bits
            index += real
            padding += code_bits - real + word_pad
            codebooks += g.codebooks.numel() * FP16_BITS
        return BitCount(
            weights=m * n,
            index_bits=index,
            codebook_bits=codebooks,
            perm_bits=n * perm_dtype_bits(n),
            bias_bits=bias_bits,
            padding_bits=padding,
        )
    if isinstance(layer, ScalarLayer):
        code_bits, word_pad = _stream_bits(m * n, layer.bits)
        scale_bits = (layer.scales.numel() + layer.zeros.numel()) * FP16_BITS
        return BitCount(
            weights=m * n, index_bits=code_bits, scale_bits=scale_bits, bias_bits=bias_bits, padding_bits=word_pad
        )
    raise UnsupportedShapeError(f"cannot count bits of {type(layer).__name__}; expected VQLayer or ScalarLayer")


def ideal_vq_bpw(
    out_features: int, in_features: int, group_bits: list[int], group_cols: list[int], sub_dim: int, n_pq: int
) -> float:
    """Spec §9.1 without perm or scales: (indices + fp16 codebooks) / (M * N).

    ``group_bits[g]`` is b_g, ``group_cols[g]`` is |G_g|; each group has ``n_pq`` codebooks of
    ``2**(b_g * sub_dim)`` entries of ``sub_dim`` fp16 values.
    """
    if len(group_bits) != len(group_cols):
        raise ConfigError(f"{len(group_bits)} group bit widths for {len(group_cols)} groups")
    if sum(group_cols) != in_features:
        raise ConfigError(f"group columns sum to {sum(group_cols)}, expected in_features={in_features}")
    index = sum(out_features * cols * b for b, cols in zip(group_bits, group_cols, strict=True))
    codebooks = sum(n_pq * 2 ** (b * sub_dim) * sub_dim * FP16_BITS for b in group_bits)
    return (index + codebooks) / (out_features * in_features)


def model_bits(layers: dict[str, QuantizedLayer], model: nn.Module) -> dict[str, Any]:
    """Bits per weight of a model whose ``layers`` are quantized.

    Returns a dict with
      * ``quantized``: BitCount dict summed over the quantized layers (bpw over their weights);
      * ``all_bpw``: bits of every stored parameter over the number of parameters, counting
        non-quantized parameters at 16 bits (fp16, as ``save_artifact`` stores them) and the
        quantized layers' biases at 16 bits too;
      * ``n_params``: the parameter count behind ``all_bpw``;
      * ``layers``: {name: bpw} per quantized layer.
    Parameters of ``model`` under a quantized layer's name are replaced by that layer's count,
    so the model may be the FP original or one with QuantLinear modules swapped in.
    """
    total = BitCount(weights=0)
    per_layer: dict[str, float] = {}
    for name, layer in layers.items():
        count = layer_bits(layer)
        total = total + count
        per_layer[name] = count.bpw
    prefixes = tuple(f"{name}." for name in layers)
    other_params = 0
    # named_parameters() yields tied parameters once, which matches the deduplicated storage.
    for pname, param in model.named_parameters():
        if not pname.startswith(prefixes):
            other_params += param.numel()
    n_bias = sum(layer.bias.numel() for layer in layers.values() if layer.bias is not None)
    n_params = total.weights + n_bias + other_params
    all_bits = total.total_bits + total.bias_bits + other_params * FP16_BITS
    return {
        "quantized": total.to_dict(),
        "all_bpw": all_bits / n_params if n_params else math.nan,
        "n_params": n_params,
        "layers": per_layer,
    }
