"""The in-memory VQ layer (``rsavq_core.formats.vq`` has its stored form and its kernels).

Layout: see ``rsavq_core.formats.vq``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rsavq_core.errors import ConfigError
from rsavq_core.formats.base import FP16_BITS, SHARED_PREFIX
from rsavq_core.formats.outliers import Outliers

# The perm is stored as int16 while N <= 32767 (the rule of the format, spec §11.4), else int32.
PERM_INT16_MAX_N = 32767


def perm_dtype_bits(in_features: int) -> int:
    """Bits per stored permutation entry (see ``PERM_INT16_MAX_N``)."""
    return 16 if in_features <= PERM_INT16_MAX_N else 32


def to_subvectors(matrix: torch.Tensor, vector_len: int, n_pq: int) -> torch.Tensor:
    """[M_pad, C] (M_pad a multiple of v) -> [C, n_vectors, n_pq, d]: the column-vector layout above."""
    m_pad, cols = matrix.shape
    return matrix.T.reshape(cols, m_pad // vector_len, n_pq, vector_len // n_pq)


def shared_codebook_name(key: str) -> str:
    """The file's tensor name of the shared codebooks ``key`` (outside every layer's prefix)."""
    return f"{SHARED_PREFIX}{key}.codebooks"


@dataclass
class VQGroup:
    """One WCSG channel group of a VQ layer."""

    bits: int  # b_g: index bits per weight; each sub-vector index has bits * d bits
    start: int  # first column of the group, in permuted column order
    stop: int  # one past its last column
    codebooks: torch.Tensor  # [n_pq, 2**(bits*d), d] float16
    indices: torch.Tensor  # [stop - start, n_vectors, n_pq] int64 (unpacked, in memory)
    # The name of the codebooks when other layers share them (stored once, under
    # ``shared_codebook_name(shared)``), else None: the group's own.
    shared: str | None = None


@dataclass
class VQLayer:
    out_features: int  # M
    in_features: int  # N
    vector_len: int  # v
    n_pq: int
    perm: torch.Tensor  # [N] int64: permuted column j is original column perm[j]
    groups: list[VQGroup]
    bias: torch.Tensor | None = None  # [M] float16, copied from the original layer
    row_scale: torch.Tensor | None = None  # [M] float16 per-output-row scale, or None (scale 1)
    outliers: Outliers | None = None  # sparse fp16 residuals added to the dense weight, or None
    kind: str = field(default="vq", init=False)

    @property
    def sub_dim(self) -> int:
        return self.vector_len // self.n_pq

    @property
    def identity_perm(self) -> bool:
        """Whether the columns keep their order (then the format stores no permutation)."""
        return bool(torch.equal(self.perm.cpu(), torch.arange(self.in_features)))

    @property
    def n_vectors(self) -> int:
        """Vectors per column: ceil(M / v) (rows padded with zeros)."""
        return -(-self.out_features // self.vector_len)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [M, N] in the original column order (reference path)."""
        scale = None if self.row_scale is None else self.row_scale.to(dtype)
        return self.dequantize_books([g.codebooks.to(dtype) for g in self.groups], scale)

    def dequantize_books(
        self,
        books: list[torch.Tensor],
        row_scale: torch.Tensor | None = None,
        outlier_value: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The dense weight [M, N] with ``books[g]`` [n_pq, K_g, d] as group g's codebooks, ``row_scale``
        [M] (or None: unscaled) as the rows' scales and ``outlier_value`` [K] (or None: the stored
        ones) as the outliers' residuals; differentiable in all three."""
        m_pad = self.n_vectors * self.vector_len
        columns = []
        for g, book in zip(self.groups, books, strict=True):
            # book[p][indices[c, r, p]] -> [cols, n_vectors, n_pq, d]
            sub = torch.stack([book[p][g.indices[:, :, p]] for p in range(self.n_pq)], 2)
            columns.append(sub.reshape(g.stop - g.start, m_pad).T)
        permuted = torch.cat(columns, 1)  # [M_pad, N] in permuted column order
        dense = permuted[:, torch.argsort(self.perm)][: self.out_features]
        dense = dense if row_scale is None else dense * row_scale[:, None]
        return dense if self.outliers is None else self.outliers.add_to(dense, outlier_value)


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
    return float((index + codebooks) / (out_features * in_features))
