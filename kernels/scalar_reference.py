"""Scalar (RTN / GPTQ) layers for the kernels: their packed form and the pure-torch reference.

W[m, n] = (code[m, n] - zero[m, n // g]) * scale[m, n // g], codes packed row-major ``bits``
wide (``kernels.packing``), one fp16 scale and zero point per row and group of g inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.packing import packed_words, unpack_codes


@dataclass(frozen=True)
class PackedScalar:
    """Attributes:
    out_features, in_features: M, N. bits: code width (1..8). group_size: g.
    words: [packed_words(M*N, bits)] int32, the codes row-major.
    scales, zeros: [M, ceil(N / g)] float16. bias: [M] float16 or None.
    """

    out_features: int
    in_features: int
    bits: int
    group_size: int
    words: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bias: torch.Tensor | None

    def __post_init__(self) -> None:
        m, n, groups = self.out_features, self.in_features, -(-self.in_features // self.group_size)
        if self.words.numel() < packed_words(m * n, self.bits):
            raise ValueError(f"{self.words.numel()} words cannot hold {m}x{n} {self.bits}-bit codes")
        if tuple(self.scales.shape) != (m, groups) or tuple(self.zeros.shape) != (m, groups):
            raise ValueError(
                f"scales/zeros must be [{m}, {groups}], got {tuple(self.scales.shape)} and {tuple(self.zeros.shape)}"
            )

    @property
    def device(self) -> torch.device:
        return self.words.device


def dequantize_scalar_reference(packed: PackedScalar, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The dense weight [M, N] of ``dtype``."""
    m, n = packed.out_features, packed.in_features
    codes = unpack_codes(packed.words, packed.bits, m * n).reshape(m, n).to(dtype)
    group = torch.arange(n, device=packed.device) // packed.group_size
    return (codes - packed.zeros.to(dtype)[:, group]) * packed.scales.to(dtype)[:, group]


def scalar_linear_reference(x: torch.Tensor, packed: PackedScalar) -> torch.Tensor:
    """x: [..., N] floating -> [..., M] of x's dtype."""
    bias = packed.bias.to(x.dtype) if packed.bias is not None else None
    return F.linear(x, dequantize_scalar_reference(packed, x.dtype), bias)
