"""Least-squares codebook update on the layer's output error, codes fixed (GPTVQ's codebook update).

With the codes fixed the dequantized weight is linear in the codebook entries, Ŵ = S(C), so the
output error on the calibration inputs

    f(C) = ½ tr((S(C) − W) H (S(C) − W)ᵀ)

is a convex quadratic in C, minimised where Sᵀ(S(C) H) = Sᵀ(W H). The closed-form mean refit
(``compensation``) weighs every coordinate alone and ignores how H couples columns; this solves the
coupled problem. A [K, K] normal matrix per sub-vector coordinate would cost O(M N²) to build, so
the system is solved by conjugate gradients instead: each step is one gather (S), one [M, N] x
[N, N] product and one scatter (Sᵀ, by autograd through the gather). Entries no code uses get a
zero gradient and keep their values. The result is rounded to fp16, as stored, and kept only if
its error is below the starting codebooks'.
"""

from __future__ import annotations

import torch

from rsavq_core.formats.vq import VQLayer

CG_TOLERANCE = 1e-6  # stop when the residual's norm falls below this share of the first one


def _output_error(layer: VQLayer, books: list[torch.Tensor], target: torch.Tensor, h: torch.Tensor) -> float:
    delta = layer.dequantize_books(books) - target
    return float(((delta @ h) * delta).sum())


def least_squares_codebooks(
    layer: VQLayer,
    target: torch.Tensor,
    hessian: torch.Tensor,
    *,
    iters: int = 25,
    damping: float = 0.01,
) -> dict[str, float]:
    """Replace ``layer``'s codebooks (in place) by the minimiser of tr(ΔW H ΔWᵀ); returns the errors.

    Args:
        layer: a VQLayer; its codes and permutation are kept.
        target: [M, N] float32, the weights to reproduce, original column order.
        hessian: [N, N] float32 activation Hessian E[x xᵀ], original column order.
        iters: conjugate-gradient steps (each one GEMM of the layer's size with H).
        damping: share of mean(diag H) added to its diagonal (as in GPTQ), which keeps the
            system well-posed for columns the calibration inputs barely excite.
    Returns:
        {"before": relative error, "after": relative error, "kept": 1.0 or 0.0}; relative errors
        are tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) with the damped H.
    """
    w = target.detach().float()
    h = hessian.detach().float()
    scale = float(h.diagonal().mean().clamp_min(1e-30))
    h = (h + damping * scale * torch.eye(h.shape[0], dtype=h.dtype)) / scale
    energy = float(((w @ h) * w).sum()) or 1.0
    start = [g.codebooks.float() for g in layer.groups]
    before = _output_error(layer, start, w, h) / energy

    def apply(books: list[torch.Tensor], offset: torch.Tensor | None) -> list[torch.Tensor]:
        """Sᵀ((S(books) − offset) H): the gradient of ½ tr((S(books) − offset) H (…)ᵀ)."""
        leaves = [b.detach().clone().requires_grad_(True) for b in books]
        with torch.enable_grad():
            recon = layer.dequantize_books(leaves)
            delta = recon - offset if offset is not None else recon
            (0.5 * ((delta @ h) * delta).sum()).backward()
        return [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]

    def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))

    books = [b.clone() for b in start]
    residual = [-g for g in apply(books, w)]  # b − A c
    direction = [r.clone() for r in residual]
    rr = first = dot(residual, residual)
    for _ in range(iters):
        if rr <= (CG_TOLERANCE**2) * first or rr == 0.0:
            break
        a_dir = apply(direction, None)
        curvature = dot(direction, a_dir)
        if curvature <= 0.0:
            break
        alpha = rr / curvature
        books = [c + alpha * p for c, p in zip(books, direction, strict=True)]
        residual = [r - alpha * ap for r, ap in zip(residual, a_dir, strict=True)]
        rr_next = dot(residual, residual)
        direction = [r + (rr_next / rr) * p for r, p in zip(residual, direction, strict=True)]
        rr = rr_next
    stored = [b.half().float() for b in books]
    after = _output_error(layer, stored, w, h) / energy
    kept = after < before
    if kept:
        for group, book in zip(layer.groups, stored, strict=True):
            group.codebooks = book.half()
    return {"before": before, "after": after if kept else before, "kept": float(kept)}
