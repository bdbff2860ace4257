"""VPTQ-style channel-independent second-order error compensation with fixed codebooks (spec §7).

Columns are visited in the WCSG-permuted order (groups must stay contiguous, so this order replaces
act-order). Each column is quantized on its own against its group's codebooks; its error, scaled by
the inverse-Hessian Cholesky factor, is pushed onto the columns not yet quantized (GPTQ with lazy
block updates). Finally each codebook is refitted once, in closed form, to the column values it was
assigned to (spec §7 step 4), and re-rounded to fp16.
"""

from __future__ import annotations

import torch

from rsavq_core.errors import CalibrationError
from rsavq_core.kmeans import assign, update
from rsavq_core.layers import VQLayer, to_subvectors

BLOCK = 128


def inverse_hessian_factor(hessian: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of H⁻¹ [N, N] float64, dead-column mask [N] bool), GPTQ preprocessing."""
    h = hessian.double().clone()
    dead = h.diagonal() <= 0
    h[dead, dead] = 1.0
    mean_diag = float(h.diagonal().mean())
    for attempt in range(4):
        damped = h + damping * 10**attempt * mean_diag * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(inv, upper=True), dead
    raise CalibrationError("activation Hessian is not positive definite even after damping")


def compensate_columns(
    layer: VQLayer, target: torch.Tensor, hessian: torch.Tensor, metric: torch.Tensor | None, damping: float
) -> None:
    """Re-derive ``layer``'s indices (and refit its codebooks) in place.

    Args:
        layer: a VQLayer whose codebooks were learned on ``target``; its perm and groups are kept.
        target: [M, N] float32 in original column order (W − λñ).
        hessian: [N, N] float32 activation Hessian E[x xᵀ], original column order.
        metric: [M_pad, N] float32 elementwise weights in permuted order, or None (Euclidean).
        damping: relative diagonal damping of H (GPTQ percdamp).
    """
    m, n, v, n_pq, d = layer.out_features, layer.in_features, layer.vector_len, layer.n_pq, layer.sub_dim
    n_vec = layer.n_vectors
    perm = layer.perm
    work = target[:, perm].double()
    if n_vec * v > m:
        work = torch.cat([work, work.new_zeros(n_vec * v - m, n)])
    hinv, dead = inverse_hessian_factor(hessian[perm][:, perm], damping)
    work[:, dead] = 0.0
    group_of = [0] * n  # plain ints: read once per column, no device round trip
    for gi, g in enumerate(layer.groups):
        group_of[g.start : g.stop] = [gi] * (g.stop - g.start)
    books = [g.codebooks.float() for g in layer.groups]  # [n_pq, K, d] each
    seen = torch.empty_like(work)  # column values at the moment they were quantized

    for i1 in range(0, n, BLOCK):
        i2 = min(i1 + BLOCK, n)
        block = work[:, i1:i2].clone()
        errors = torch.zeros_like(block)
        h_block = hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = j + i1
            gi = group_of[col]
            group = layer.groups[gi]
            values = block[:, j]
            seen[:, col] = values
            sub = values.float().view(n_vec, n_pq, d)
            w_sub = metric[:, col].view(n_vec, n_pq, d) if metric is not None else None
            quant = torch.empty_like(sub)
            for p in range(n_pq):
                codes, _ = assign(sub[:, p], None if w_sub is None else w_sub[:, p], books[gi][p])
                group.indices[col - group.start, :, p] = codes
                quant[:, p] = books[gi][p][codes]
            err = (values - quant.reshape(-1).double()) / h_block[j, j]
            block[:, j:] -= err[:, None] * h_block[j, j:][None, :]
            errors[:, j] = err
        work[:, i2:] -= errors @ hinv[i1:i2, i2:]

    for gi, group in enumerate(layer.groups):
        sub = to_subvectors(seen[:, group.start : group.stop].float(), v, n_pq)
        w_sub = to_subvectors(metric[:, group.start : group.stop], v, n_pq) if metric is not None else None
        refit = []
        for p in range(n_pq):
            pts = sub[:, :, p].reshape(-1, d)
            wts = w_sub[:, :, p].reshape(-1, d) if w_sub is not None else None
            codes = group.indices[:, :, p].reshape(-1)
            cents, _ = update(pts, wts, codes, books[gi][p])
            refit.append(cents.half())
        group.codebooks = torch.stack(refit)
