"""In-memory form of one quantized linear layer, as produced by the quantizers.

Two kinds share one interface (``dequantize``, ``out_features``, ``in_features``):

* ``VQLayer``: RSAVQ / k-means vector quantization. Input channels (columns) are permuted by
  ``perm`` (WCSG order) and split into contiguous groups; group g has ``bits`` b_g per weight
  and ``n_pq`` sub-codebooks of ``2**(b_g*d)`` entries of dimension d = vector_len / n_pq.
  Vectors run down the output rows inside one input column (VPTQ layout, spec §11.1): rows are
  padded to a multiple of vector_len, cut into vectors of vector_len rows, and each vector into
  n_pq sub-vectors of d consecutive rows; sub-vector p of every vector uses sub-codebook p.
* ``ScalarLayer``: round-to-nearest / GPTQ, asymmetric integer codes with one fp16 scale and
  zero point per (row, group of ``group_size`` input channels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def to_subvectors(matrix: torch.Tensor, vector_len: int, n_pq: int) -> torch.Tensor:
    """[M_pad, C] (M_pad a multiple of v) -> [C, n_vectors, n_pq, d]: the column-vector layout above."""
    m_pad, cols = matrix.shape
    return matrix.T.reshape(cols, m_pad // vector_len, n_pq, vector_len // n_pq)


@dataclass
class VQGroup:
    """One WCSG channel group of a VQ layer."""

    bits: int  # b_g: index bits per weight; each sub-vector index has bits * d bits
    start: int  # first column of the group, in permuted column order
    stop: int  # one past its last column
    codebooks: torch.Tensor  # [n_pq, 2**(bits*d), d] float16
    indices: torch.Tensor  # [stop - start, n_vectors, n_pq] int64 (unpacked, in memory)


@dataclass
class VQLayer:
    out_features: int  # M
    in_features: int  # N
    vector_len: int  # v
    n_pq: int
    perm: torch.Tensor  # [N] int64: permuted column j is original column perm[j]
    groups: list[VQGroup]
    bias: torch.Tensor | None = None  # [M] float16, copied from the original layer
    kind: str = field(default="vq", init=False)

    @property
    def sub_dim(self) -> int:
        return self.vector_len // self.n_pq

    @property
    def n_vectors(self) -> int:
        """Vectors per column: ceil(M / v) (rows padded with zeros)."""
        return -(-self.out_features // self.vector_len)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [M, N] in the original column order (reference path)."""
        m_pad = self.n_vectors * self.vector_len
        permuted = torch.empty(m_pad, self.in_features, dtype=dtype, device=self.perm.device)
        for g in self.groups:
            # codebooks[p][indices[c, r, p]] -> [cols, n_vectors, n_pq, d]
            sub = torch.stack([g.codebooks[p].to(dtype)[g.indices[:, :, p]] for p in range(self.n_pq)], 2)
            permuted[:, g.start : g.stop] = sub.reshape(g.stop - g.start, m_pad).T
        weight = torch.empty_like(permuted)
        weight[:, self.perm] = permuted
        return weight[: self.out_features]


@dataclass
class ScalarLayer:
    out_features: int  # M
    in_features: int  # N
    bits: int
    group_size: int
    codes: torch.Tensor  # [M, N] uint8, values in [0, 2**bits)
    scales: torch.Tensor  # [M, ceil(N / group_size)] float16
    zeros: torch.Tensor  # [M, ceil(N / group_size)] float16 (zero point in code units)
    bias: torch.Tensor | None = None  # [M] float16
    kind: str = field(default="scalar", init=False)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [M, N]: (code - zero) * scale, per (row, input-channel group)."""
        idx = torch.arange(self.in_features, device=self.codes.device) // self.group_size
        scale = self.scales.to(dtype)[:, idx]
        zero = self.zeros.to(dtype)[:, idx]
        return (self.codes.to(dtype) - zero) * scale


QuantizedLayer = VQLayer | ScalarLayer
