"""VPTQ-style channel-independent second-order error compensation with fixed codebooks (spec §7).

Columns are visited in the WCSG-permuted order (groups must stay contiguous, so this order replaces
act-order). Each column is quantized on its own against its group's codebooks; its error, scaled by
the inverse-Hessian Cholesky factor, is pushed onto the columns not yet quantized (GPTQ's column
loop with lazy block updates, ``column_loop``). Finally each codebook is refitted once, in closed
form, to the column values it was assigned to (spec §7 step 4), and re-rounded to fp16.
"""

from __future__ import annotations

import torch

from rsavq_core.algorithms.column_loop import Block, quantize_columns
from rsavq_core.algorithms.kmeans import assign, search_table, update
from rsavq_core.algorithms.linalg import dead_columns, inverse_hessian_factor
from rsavq_core.formats.vq_layer import VQLayer, to_subvectors

BLOCK = 128


def compensate_columns(
    layer: VQLayer,
    target: torch.Tensor,
    hessian: torch.Tensor,
    metric: torch.Tensor | None,
    damping: float,
    exact: torch.Tensor | None = None,
    refit: bool = True,
) -> torch.Tensor:
    """Re-derive ``layer``'s indices (and refit its codebooks) in place; returns the column values at
    the moment each column was quantized, [M_pad, N] float32 in permuted order (what the weights
    marked ``exact`` must be stored as for the fed-forward errors to cancel).

    Args:
        layer: a VQLayer whose codebooks were learned on ``target``; its perm and groups are kept.
        target: [M, N] float32 in original column order (W − λñ).
        hessian: [N, N] float32 activation Hessian E[x xᵀ], original column order.
        metric: [M_pad, N] float32 elementwise weights in permuted order, or None (Euclidean).
        damping: relative diagonal damping of H (GPTQ percdamp).
        exact: [M_pad, N] bool in permuted order, or None: weights that will be stored exactly
            (outliers): they carry no error forward.
        refit: refit each codebook to the values assigned to it (False: the codebooks are fixed,
            e.g. shared with other layers).
    """
    m, n, v, n_pq, d = layer.out_features, layer.in_features, layer.vector_len, layer.n_pq, layer.sub_dim
    n_vec = layer.n_vectors
    perm = layer.perm
    what = f"compensation of a [{m} x {n}] layer"
    work = target[:, perm].double()
    if n_vec * v > m:
        work = torch.cat([work, work.new_zeros(n_vec * v - m, n)])
    dead = dead_columns(hessian, what)[perm]
    upper, _ = inverse_hessian_factor(hessian, damping, what=what, order=perm)
    work[:, dead] = 0.0
    group_of = [0] * n  # plain ints: read once per column, no device round trip
    for gi, g in enumerate(layer.groups):
        group_of[g.start : g.stop] = [gi] * (g.stop - g.start)
    books = [g.codebooks.float() for g in layer.groups]  # [n_pq, K, d] each
    # every column searches its group's codebooks: build their search tables once, not per column
    tables = [[search_table(book) for book in group_books] for group_books in books]
    seen = torch.empty_like(work)  # column values at the moment they were quantized

    def quantize(col: int, values: torch.Tensor, block: Block) -> torch.Tensor:
        gi = group_of[col]
        group = layer.groups[gi]
        seen[:, col] = values
        sub = values.float().view(n_vec, n_pq, d)
        w_sub = metric[:, col].view(n_vec, n_pq, d) if metric is not None else None
        quant = torch.empty_like(sub)
        for p in range(n_pq):
            codes, _ = assign(sub[:, p], None if w_sub is None else w_sub[:, p], books[gi][p], tables[gi][p])
            group.indices[col - group.start, :, p] = codes
            quant[:, p] = books[gi][p][codes]
        out = quant.reshape(-1).double()
        if exact is not None:
            keep = exact[:, col]
            out[keep] = values[keep]
        return out

    quantize_columns(work, upper, quantize, BLOCK)
    if not refit:
        return seen.float()
    for gi, group in enumerate(layer.groups):
        sub = to_subvectors(seen[:, group.start : group.stop].float(), v, n_pq)
        w_sub = to_subvectors(metric[:, group.start : group.stop], v, n_pq) if metric is not None else None
        books_refit = []
        for p in range(n_pq):
            pts = sub[:, :, p].reshape(-1, d)
            wts = w_sub[:, :, p].reshape(-1, d) if w_sub is not None else None
            codes = group.indices[:, :, p].reshape(-1)
            cents, _ = update(pts, wts, codes, books[gi][p])
            books_refit.append(cents.half())
        group.codebooks = torch.stack(books_refit)
    return seen.float()
