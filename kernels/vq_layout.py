"""The kernel-side form of one VQ layer: every group's packed indices and codebooks in one buffer each.

A VQ layer (``rsavq_core.formats.vq``) has G channel groups, each with its own code width and
codebook size. Rather than one launch per group, the kernels take the groups concatenated and a
small *tile table*: one row per tile of permuted columns, each tile inside a single group, giving
where that group's bits and codebooks start. One launch then covers the whole layer and the grid
has enough column tiles to keep every SM busy even when M is small (split-K).

Index addressing (the packed checkpoint's layout, see ``rsavq_core.formats.vq``): inside group g, permuted
column j holds Q = n_vectors * n_pq codes in sequence; code q covers output rows
[q*d, q*d + d) with sub-codebook q % n_pq, and lives at bits [c*((j - start)*Q + q), +c) of the
group's stream, c = bits_g * d. The dense weight is W[m, perm[j]] = CB_g[q % n_pq][code][m % d].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Tile table columns.
COL_START, COL_STOP, GROUP_START, CODE_BITS, WORD_OFFSET, CODEBOOK_OFFSET = range(6)
TILE_FIELDS = 6
# A code is extracted from at most two 32-bit words, and codebooks of 2**24 entries would not fit
# any cache anyway; wider codes take the reference path.
MAX_CODE_BITS = 24


@dataclass(frozen=True)
class PackedVQ:
    """One VQ layer ready for the kernels, all tensors on one device.

    Attributes:
        out_features, in_features: M, N.
        sub_dim: d, rows per code. n_pq: sub-codebooks per group. codes_per_col: Q = ceil(M / v) * n_pq.
        perm: [N] int32; permuted column j is original column perm[j].
        words: [W] int32; the groups' packed index streams, concatenated.
        codebooks: [C] float16; the groups' [n_pq, K_g, d] codebooks, flattened and concatenated.
        tiles: [T, 6] int64; per column tile (col_start, col_stop, group_start, code_bits,
            word_offset, codebook_offset), tiles never straddle a group boundary.
        bias: [M] float16 or None.
        row_scale: [M] float16 or None; W[m, :] is multiplied by row_scale[m] (the kernels apply it
            to their fp32 output rows, which is exact for a GEMV and one pass for the dequantizer).
        outlier_rows, outlier_cols: [K] int64 or None; outlier_value: [K] float16 or None: sparse
            residuals added to W (after the row scales) at (row, original column).
    """

    out_features: int
    in_features: int
    sub_dim: int
    n_pq: int
    codes_per_col: int
    perm: torch.Tensor
    words: torch.Tensor
    codebooks: torch.Tensor
    tiles: torch.Tensor
    bias: torch.Tensor | None
    max_code_bits: int
    row_scale: torch.Tensor | None = None
    outlier_rows: torch.Tensor | None = None
    outlier_cols: torch.Tensor | None = None
    outlier_value: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.words.device


def build_packed_vq(
    *,
    out_features: int,
    in_features: int,
    vector_len: int,
    n_pq: int,
    groups: list[tuple[int, int, int]],
    perm: torch.Tensor,
    codebooks: list[torch.Tensor],
    words: list[torch.Tensor],
    bias: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    outliers: tuple[torch.Tensor, torch.Tensor] | None = None,
    tile_cols: int = 128,
) -> PackedVQ:
    """Concatenate a layer's groups and cut its columns into tiles of at most ``tile_cols``.

    Args:
        groups: per group (bits per weight, first permuted column, one past the last).
        perm: [N] integer tensor. codebooks: per group [n_pq, 2**(bits*d), d] float16.
        words: per group the int32 word stream of its indices (``pack_codes`` of
            [cols, n_vectors, n_pq], bits*d bits per code).
        bias: [M] floating or None. row_scale: [M] floating or None, the rows' scales.
        outliers: (flat positions m * N + n [K] integer, residuals [K] floating) or None.
    """
    if vector_len % n_pq:
        raise ValueError(f"vector length {vector_len} is not a multiple of n_pq {n_pq}")
    d = vector_len // n_pq
    q = -(-out_features // vector_len) * n_pq
    rows, word_off, cb_off = [], 0, 0
    max_bits = 0
    for (bits, start, stop), cb, stream in zip(groups, codebooks, words, strict=True):
        code_bits = bits * d
        if code_bits > MAX_CODE_BITS:
            raise ValueError(f"{code_bits}-bit codes exceed the kernels' {MAX_CODE_BITS}")
        if tuple(cb.shape) != (n_pq, 2**code_bits, d):
            raise ValueError(f"group codebooks have shape {tuple(cb.shape)}, expected {(n_pq, 2**code_bits, d)}")
        max_bits = max(max_bits, code_bits)
        for col in range(start, stop, tile_cols):
            rows.append((col, min(col + tile_cols, stop), start, code_bits, word_off, cb_off))
        word_off += stream.numel()
        cb_off += cb.numel()
    device = perm.device
    return PackedVQ(
        out_features=out_features,
        in_features=in_features,
        sub_dim=d,
        n_pq=n_pq,
        codes_per_col=q,
        perm=perm.to(device=device, dtype=torch.int32).contiguous(),
        words=torch.cat([w.reshape(-1) for w in words]).to(device=device, dtype=torch.int32).contiguous(),
        codebooks=torch.cat([c.reshape(-1) for c in codebooks]).to(device=device, dtype=torch.float16),
        tiles=torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1, TILE_FIELDS),
        bias=None if bias is None else bias.to(device=device, dtype=torch.float16),
        max_code_bits=max_bits,
        row_scale=None if row_scale is None else row_scale.to(device=device, dtype=torch.float16),
        outlier_rows=None if outliers is None else (outliers[0].to(device, torch.int64) // in_features),
        outlier_cols=None if outliers is None else (outliers[0].to(device, torch.int64) % in_features),
        outlier_value=None if outliers is None else outliers[1].to(device=device, dtype=torch.float16),
    )


def add_outliers_to_weight(weight: torch.Tensor, packed: PackedVQ) -> torch.Tensor:
    """weight [M, N] (in place) + the layer's sparse residuals; returns it."""
    if packed.outlier_value is not None:
        assert packed.outlier_rows is not None and packed.outlier_cols is not None
        weight.index_put_(
            (packed.outlier_rows, packed.outlier_cols), packed.outlier_value.to(weight.dtype), accumulate=True
        )
    return weight


def add_outliers_to_output(out: torch.Tensor, x: torch.Tensor, packed: PackedVQ) -> torch.Tensor:
    """out [B, M] (in place) + x [B, N] times the sparse residuals: the outliers' part of x @ W.T."""
    if packed.outlier_value is not None:
        assert packed.outlier_rows is not None and packed.outlier_cols is not None
        contributions = x[:, packed.outlier_cols].to(out.dtype) * packed.outlier_value.to(out.dtype)
        out.index_add_(1, packed.outlier_rows, contributions)
    return out
