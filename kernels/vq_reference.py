"""Pure-torch references for the VQ kernels: same inputs (``PackedVQ``), same results.

These run anywhere (CPU, any dtype) and are what dispatch falls back to when the device, dtype
or shape is not one the Triton kernels support.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.packing import packed_words, unpack_codes
from kernels.vq_layout import (
    CODE_BITS,
    CODEBOOK_OFFSET,
    COL_START,
    COL_STOP,
    GROUP_START,
    WORD_OFFSET,
    PackedVQ,
    add_outliers_to_weight,
)


def group_extents(packed: PackedVQ) -> list[tuple[int, int, int, int, int]]:
    """Per group (start, stop, code_bits, word_offset, codebook_offset), recovered from the tile table."""
    groups: dict[int, list[int]] = {}
    for row in packed.tiles.tolist():
        start = row[GROUP_START]
        if start in groups:
            groups[start][1] = max(groups[start][1], row[COL_STOP])
        else:
            groups[start] = [row[COL_START], row[COL_STOP], row[CODE_BITS], row[WORD_OFFSET], row[CODEBOOK_OFFSET]]
    return [(g[0], g[1], g[2], g[3], g[4]) for g in sorted(groups.values())]


def dequantize_reference(packed: PackedVQ, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The dense weight [M, N] of ``dtype`` in the original column order."""
    m, d, q = packed.out_features, packed.sub_dim, packed.codes_per_col
    weight = torch.zeros(m, packed.in_features, dtype=dtype, device=packed.device)
    sub = torch.arange(q, device=packed.device) % packed.n_pq  # sub-codebook of each code in a column
    for start, stop, code_bits, word_off, cb_off in group_extents(packed):
        count = (stop - start) * q
        stream = packed.words[word_off : word_off + packed_words(count, code_bits)]
        codes = unpack_codes(stream, code_bits, count).reshape(stop - start, q)
        k = 2**code_bits
        book = packed.codebooks[cb_off : cb_off + packed.n_pq * k * d].view(packed.n_pq, k, d).to(dtype)
        cols = book[sub[None, :], codes]  # [cols, Q, d]
        weight[:, packed.perm[start:stop].long()] = cols.reshape(stop - start, q * d)[:, :m].T
    if packed.row_scale is not None:
        weight *= packed.row_scale.to(dtype)[:, None]
    return add_outliers_to_weight(weight, packed)


def vq_linear_reference(x: torch.Tensor, packed: PackedVQ) -> torch.Tensor:
    """x: [..., N] floating -> [..., M] of x's dtype: x @ W.T + bias, W dequantized in x's dtype."""
    bias = packed.bias.to(x.dtype) if packed.bias is not None else None
    return F.linear(x, dequantize_reference(packed, x.dtype), bias)
