"""Triton kernels for VQ layers: a fused codebook-lookup GEMV (decode) and a dequantizer (prefill).

Both read the bit-packed indices straight from the word stream, look the codewords up in the
per-group codebooks (a few KB: 2**(b*d) entries of d fp16 values, so they stay in L1 across a
tile), and undo the channel permutation by gathering x (GEMV) or scattering columns (dequant).
Nothing here expands the whole weight in the GEMV: each program holds a BLOCK_M x BLOCK_K tile.

Grid: (row blocks, column tiles of ``PackedVQ.tiles``). Column tiles are a split-K: each
program adds its partial dot products into an fp32 output with atomics, so one launch covers all
groups of a layer and a 4096-row layer still fills an H100's SMs. References: ``vq_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.vq_layout import TILE_FIELDS, PackedVQ, add_outliers_to_output, add_outliers_to_weight


@triton.jit
def read_codes(words_ptr, code_idx, code_bits, ok):
    """Codes ``code_idx`` (int64, any shape) of a stream of ``code_bits``-bit codes, as int64.

    Code i sits at stream bits [i*c, i*c + c), least significant first, possibly straddling two
    int32 words (``kernels.packing``). 1 <= code_bits <= 24, so no shift is by 32.
    """
    bit = code_idx * code_bits.to(tl.int64)
    word = bit >> 5
    shift = (bit & 31).to(tl.uint32)
    lo = tl.load(words_ptr + word, mask=ok, other=0).to(tl.uint32, bitcast=True)
    straddles = shift + code_bits > 32
    hi = tl.load(words_ptr + word + 1, mask=ok & straddles, other=0).to(tl.uint32, bitcast=True)
    value = (lo >> shift) | tl.where(straddles, hi << ((32 - shift) & 31), 0)
    # Keep the low code_bits bits with two logical shifts.
    return ((value << (32 - code_bits)) >> (32 - code_bits)).to(tl.int64)


@triton.jit
def _codewords(words_ptr, cb_ptr, tile_ptr, rows, cols, col_stop, row_ok, Q, D: tl.constexpr, N_PQ: tl.constexpr):
    """The [BLOCK_M, BLOCK_K] fp32 weight tile (permuted columns) of one column tile."""
    group_start = tl.load(tile_ptr + 2)
    code_bits = tl.load(tile_ptr + 3).to(tl.uint32)
    word_off = tl.load(tile_ptr + 4)
    cb_off = tl.load(tile_ptr + 5)
    code_row = rows // D  # which code of the column covers this row
    ok = row_ok[:, None] & (cols < col_stop)[None, :]
    code_idx = (cols - group_start).to(tl.int64)[None, :] * Q + code_row.to(tl.int64)[:, None]
    code = read_codes(words_ptr + word_off, code_idx, code_bits, ok)
    n_codes = tl.full((), 1, tl.int64) << code_bits.to(tl.int64)
    entry = ((code_row % N_PQ).to(tl.int64)[:, None] * n_codes + code) * D + (rows % D).to(tl.int64)[:, None]
    return tl.load(cb_ptr + cb_off + entry, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _vq_gemv_kernel(
    x_ptr,
    perm_ptr,
    words_ptr,
    cb_ptr,
    tiles_ptr,
    out_ptr,
    B,
    M,
    Q,
    stride_xb,
    stride_ob,
    D: tl.constexpr,
    N_PQ: tl.constexpr,
    FIELDS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile_ptr = tiles_ptr + tl.program_id(1) * FIELDS
    col_start = tl.load(tile_ptr)
    col_stop = tl.load(tile_ptr + 1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    batch = tl.arange(0, BLOCK_B)
    batch_ok = batch < B
    acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
    for k0 in range(col_start, col_stop, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < col_stop
        src = tl.load(perm_ptr + cols, mask=col_ok, other=0).to(tl.int64)  # the permutation, on x
        xv = tl.load(
            x_ptr + batch.to(tl.int64)[:, None] * stride_xb + src[None, :],
            mask=batch_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        w = _codewords(words_ptr, cb_ptr, tile_ptr, rows, cols, col_stop, row_ok, Q, D, N_PQ)
        acc += tl.sum(w[None, :, :] * xv[:, None, :], axis=2)
    tl.atomic_add(
        out_ptr + batch.to(tl.int64)[:, None] * stride_ob + rows[None, :], acc, mask=batch_ok[:, None] & row_ok[None, :]
    )


@triton.jit
def _vq_dequant_kernel(
    perm_ptr,
    words_ptr,
    cb_ptr,
    tiles_ptr,
    w_ptr,
    M,
    Q,
    stride_wm,
    D: tl.constexpr,
    N_PQ: tl.constexpr,
    FIELDS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile_ptr = tiles_ptr + tl.program_id(1) * FIELDS
    col_start = tl.load(tile_ptr)
    col_stop = tl.load(tile_ptr + 1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    for k0 in range(col_start, col_stop, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < col_stop
        dst = tl.load(perm_ptr + cols, mask=col_ok, other=0).to(tl.int64)
        w = _codewords(words_ptr, cb_ptr, tile_ptr, rows, cols, col_stop, row_ok, Q, D, N_PQ)
        tl.store(
            w_ptr + rows.to(tl.int64)[:, None] * stride_wm + dst[None, :],
            w.to(w_ptr.dtype.element_ty),
            mask=row_ok[:, None] & col_ok[None, :],
        )


def _block_b(batch: int) -> int:
    return max(1, int(triton.next_power_of_2(batch)))


def vq_gemv(x: torch.Tensor, packed: PackedVQ, block_m: int = 64, block_k: int = 32) -> torch.Tensor:
    """x: [B, N] fp16/bf16/fp32, B small (decode) -> [B, M] of x's dtype; fp32 accumulation.

    The row scales and the bias are applied here. ``x`` must be on ``packed.device``.
    """
    batch = x.shape[0]
    x = x.contiguous()
    out = torch.zeros(batch, packed.out_features, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(packed.out_features, block_m), packed.tiles.shape[0])
    _vq_gemv_kernel[grid](
        x,
        packed.perm,
        packed.words,
        packed.codebooks,
        packed.tiles,
        out,
        batch,
        packed.out_features,
        packed.codes_per_col,
        x.stride(0),
        out.stride(0),
        D=packed.sub_dim,
        N_PQ=packed.n_pq,
        FIELDS=TILE_FIELDS,
        BLOCK_B=_block_b(batch),
        BLOCK_M=block_m,
        BLOCK_K=block_k,
    )
    if packed.row_scale is not None:
        out *= packed.row_scale.float()  # split-K partial sums are complete here, so scaling is exact
    add_outliers_to_output(out, x, packed)  # a sparse product: K is a small share of M * N
    if packed.bias is not None:
        out += packed.bias.float()
    return out.to(x.dtype)


def vq_dequantize(packed: PackedVQ, dtype: torch.dtype, block_m: int = 64, block_k: int = 32) -> torch.Tensor:
    """The dense weight [M, N] of ``dtype`` (fp16/bf16/fp32) in the original column order."""
    weight = torch.empty(packed.out_features, packed.in_features, dtype=dtype, device=packed.device)
    grid = (triton.cdiv(packed.out_features, block_m), packed.tiles.shape[0])
    _vq_dequant_kernel[grid](
        packed.perm,
        packed.words,
        packed.codebooks,
        packed.tiles,
        weight,
        packed.out_features,
        packed.codes_per_col,
        weight.stride(0),
        D=packed.sub_dim,
        N_PQ=packed.n_pq,
        FIELDS=TILE_FIELDS,
        BLOCK_M=block_m,
        BLOCK_K=block_k,
    )
    if packed.row_scale is not None:
        weight *= packed.row_scale.to(dtype)[:, None]
    return add_outliers_to_weight(weight, packed)
