"""Least-squares codebook update on the layer's output error, codes fixed (GPTVQ's codebook update).

With the codes fixed the dequantized weight is linear in the codebook entries, Ŵ = S(C), so the
output error on the calibration inputs

    f(C) = ½ tr((S(C) − W) H (S(C) − W)ᵀ)

is a convex quadratic in C, minimised where Sᵀ(S(C) H) = Sᵀ(W H). The closed-form mean refit
(``compensation``) weighs every coordinate alone and ignores how H couples columns; this solves the
coupled problem. A [K, K] normal matrix per sub-vector coordinate would cost O(M N²) to build, so
the system is solved by conjugate gradients instead: each step is one gather (S), one [M, N] x
[N, N] product and one scatter (Sᵀ), all in the layer's permuted column order. Entries no code uses get a
zero gradient and keep their values. The result is rounded to fp16, as stored, and kept only if
its error is below the starting codebooks'.
"""

from __future__ import annotations

import torch

from rsavq_core.formats.vq_layer import VQLayer

CG_TOLERANCE = 1e-6  # stop when the residual's norm falls below this share of the first one


class _Selection:
    """S and Sᵀ of one layer in its permuted, row-padded layout (no argsort, no autograd per step)."""

    def __init__(self, layer: VQLayer) -> None:
        self.layer = layer
        self.m_pad = layer.n_vectors * layer.vector_len
        # Per group: the codes as rows of its n_pq codebooks stacked into one [n_pq * K, d] table,
        # so that a gather and a scatter are one indexing operation each.
        self.flat_codes = []
        for g in layer.groups:
            k = g.codebooks.shape[1]
            offsets = torch.arange(layer.n_pq, dtype=g.indices.dtype) * k
            self.flat_codes.append((g.indices + offsets).reshape(-1))

    def gather(self, books: list[torch.Tensor]) -> torch.Tensor:
        """S(books), transposed: [N, M_pad] (permuted columns as rows, contiguous); books[g] is [n_pq, K_g, d]."""
        d = self.layer.sub_dim
        columns = [
            book.reshape(-1, d)[codes].reshape(g.stop - g.start, self.m_pad)
            for g, book, codes in zip(self.layer.groups, books, self.flat_codes, strict=True)
        ]
        return torch.cat(columns, 0)

    def scatter(self, grad_t: torch.Tensor) -> list[torch.Tensor]:
        """Sᵀ(grad): per group [n_pq, K_g, d], sums of grad_t [N, M_pad] (transposed) over each entry's positions."""
        out = []
        d = self.layer.sub_dim
        for g, codes in zip(self.layer.groups, self.flat_codes, strict=True):
            sub = grad_t[g.start : g.stop].reshape(-1, d)  # [cols * n_vec * n_pq, d], the codes' order
            table = grad_t.new_zeros(g.codebooks.shape[0] * g.codebooks.shape[1], d).index_add_(0, codes, sub)
            out.append(table.view(g.codebooks.shape))
        return out


def least_squares_codebooks(
    layer: VQLayer,
    target: torch.Tensor,
    hessian: torch.Tensor,
    *,
    iters: int = 10,
    damping: float = 0.01,
    row_weights: torch.Tensor | None = None,
    exact: torch.Tensor | None = None,
) -> dict[str, float]:
    """Replace ``layer``'s codebooks (in place) by the minimiser of tr(ΔW H ΔWᵀ); returns the errors.

    Args:
        layer: a VQLayer; its codes and permutation are kept.
        target: [M, N] float32, the weights to reproduce, original column order.
        hessian: [N, N] float32 activation Hessian E[x xᵀ], original column order.
        iters: conjugate-gradient steps (each one GEMM of the layer's size with H).
        damping: share of mean(diag H) added to its diagonal (as in GPTQ), which keeps the
            system well-posed for columns the calibration inputs barely excite.
        row_weights: [M] float or None; row m's error counts row_weights[m]² times (the layer's
            row scales, when the codebooks quantize W / s: the error in the weight is s times theirs).
        exact: [M_pad, N] bool in permuted order, or None: weights stored exactly (outliers), whose
            error is zero whatever the codebooks.
    Returns:
        {"before": relative error, "after": relative error, "kept": 1.0 or 0.0}; relative errors
        are tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) with the damped H.
    """
    # Everything below is transposed ([N, M_pad]: one row per permuted input column) so that a
    # group's columns are contiguous rows, laid out in the codes' order; H is symmetric, so the
    # transposed gradient (ΔW H)ᵀ is H ΔWᵀ.
    sel = _Selection(layer)
    m = layer.out_features
    perm = layer.perm
    w = target.detach().float()[:, perm].T
    w = torch.cat([w, w.new_zeros(w.shape[0], sel.m_pad - m)], 1).contiguous()
    h = hessian.detach().float()[perm][:, perm]
    scale = float(h.diagonal().mean().clamp_min(1e-30))
    h = (h + damping * scale * torch.eye(h.shape[0], dtype=h.dtype)) / scale
    rows = torch.zeros(1, sel.m_pad)
    rows[:, :m] = 1.0 if row_weights is None else row_weights.float()  # padded rows: no error, no gradient
    if exact is not None:  # [N, M_pad] weights of every position
        rows = rows * (~exact).T.float()

    def apply(books: list[torch.Tensor], offset: torch.Tensor | None) -> tuple[list[torch.Tensor], float]:
        """(Sᵀ((S(books) − offset) H), tr((S(books) − offset) H (…)ᵀ)): the gradient of half the
        quadratic and its value, from one product with H."""
        recon = sel.gather(books)
        delta = (recon - offset if offset is not None else recon) * rows
        h_delta = h @ delta
        return sel.scatter(h_delta * rows), float((h_delta * delta).sum())

    def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))

    energy = float(((h @ (w * rows)) * (w * rows)).sum()) or 1.0
    books = [g.codebooks.float() for g in layer.groups]
    gradient, start_error = apply(books, w)
    before = start_error / energy
    residual = [-g for g in gradient]  # b − A c
    direction = [r.clone() for r in residual]
    rr = first = dot(residual, residual)
    for _ in range(iters):
        if rr <= (CG_TOLERANCE**2) * first or rr == 0.0:
            break
        a_dir, _ = apply(direction, None)
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
    after = apply(stored, w)[1] / energy
    kept = after < before
    if kept:
        for group, book in zip(layer.groups, stored, strict=True):
            group.codebooks = book.half()
    return {"before": before, "after": after if kept else before, "kept": float(kept)}
