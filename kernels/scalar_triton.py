"""Triton kernels for scalar (RTN / GPTQ) layers: fused dequantize-GEMV for decode, dequantizer for prefill.

Same structure as the VQ kernels (``vq_triton``): codes are read straight from the packed word
stream, each program covers BLOCK_M rows of one column tile (split-K, fp32 atomics), and the
weight is never built in the GEMV. Reference: ``scalar_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.scalar_reference import PackedScalar
from kernels.vq_triton import read_codes


@triton.jit
def _weights(words_ptr, scales_ptr, zeros_ptr, rows, cols, ok, N, n_groups, bits, group_size):
    """The [BLOCK_M, BLOCK_K] fp32 weight tile at (rows, cols)."""
    code_idx = rows.to(tl.int64)[:, None] * N + cols.to(tl.int64)[None, :]
    code = read_codes(words_ptr, code_idx, bits.to(tl.uint32), ok).to(tl.float32)
    meta = rows.to(tl.int64)[:, None] * n_groups + (cols // group_size).to(tl.int64)[None, :]
    scale = tl.load(scales_ptr + meta, mask=ok, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + meta, mask=ok, other=0.0).to(tl.float32)
    return (code - zero) * scale


# `bits` is used as a tensor (`.to`): Triton would turn an int argument equal to 1 into a constant.
@triton.jit(do_not_specialize=["bits"])
def _scalar_gemv_kernel(
    x_ptr,
    words_ptr,
    scales_ptr,
    zeros_ptr,
    out_ptr,
    B,
    M,
    N,
    n_groups,
    bits,
    group_size,
    stride_xb,
    stride_ob,
    TILE_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    batch = tl.arange(0, BLOCK_B)
    batch_ok = batch < B
    acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
    tile_start = tl.program_id(1) * TILE_K
    for k0 in range(tile_start, tile_start + TILE_K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < N
        xv = tl.load(
            x_ptr + batch.to(tl.int64)[:, None] * stride_xb + cols[None, :],
            mask=batch_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        w = _weights(
            words_ptr,
            scales_ptr,
            zeros_ptr,
            rows,
            cols,
            row_ok[:, None] & col_ok[None, :],
            N,
            n_groups,
            bits,
            group_size,
        )
        acc += tl.sum(w[None, :, :] * xv[:, None, :], axis=2)
    tl.atomic_add(
        out_ptr + batch.to(tl.int64)[:, None] * stride_ob + rows[None, :], acc, mask=batch_ok[:, None] & row_ok[None, :]
    )


@triton.jit(do_not_specialize=["bits"])
def _scalar_dequant_kernel(
    words_ptr,
    scales_ptr,
    zeros_ptr,
    w_ptr,
    M,
    N,
    n_groups,
    bits,
    group_size,
    stride_wm,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    w = _weights(words_ptr, scales_ptr, zeros_ptr, rows, cols, ok, N, n_groups, bits, group_size)
    tl.store(w_ptr + rows.to(tl.int64)[:, None] * stride_wm + cols[None, :], w.to(w_ptr.dtype.element_ty), mask=ok)


def scalar_gemv(
    x: torch.Tensor, packed: PackedScalar, block_m: int = 64, block_k: int = 32, tile_k: int = 256
) -> torch.Tensor:
    """x: [B, N] fp16/bf16/fp32, B small -> [B, M] of x's dtype (bias added); fp32 accumulation."""
    batch, (m, n) = x.shape[0], (packed.out_features, packed.in_features)
    x = x.contiguous()
    out = torch.zeros(batch, m, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, tile_k))
    _scalar_gemv_kernel[grid](
        x,
        packed.words,
        packed.scales,
        packed.zeros,
        out,
        batch,
        m,
        n,
        packed.scales.shape[1],
        packed.bits,
        packed.group_size,
        x.stride(0),
        out.stride(0),
        TILE_K=tile_k,
        BLOCK_B=max(1, triton.next_power_of_2(batch)),
        BLOCK_M=block_m,
        BLOCK_K=block_k,
    )
    if packed.bias is not None:
        out += packed.bias.float()
    return out.to(x.dtype)


def scalar_dequantize(packed: PackedScalar, dtype: torch.dtype, block_m: int = 64, block_k: int = 64) -> torch.Tensor:
    """The dense weight [M, N] of ``dtype``."""
    m, n = packed.out_features, packed.in_features
    weight = torch.empty(m, n, dtype=dtype, device=packed.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_k))
    _scalar_dequant_kernel[grid](
        packed.words,
        packed.scales,
        packed.zeros,
        weight,
        m,
        n,
        packed.scales.shape[1],
        packed.bits,
        packed.group_size,
        weight.stride(0),
        BLOCK_M=block_m,
        BLOCK_K=block_k,
    )
    return weight
