"""Weighted k-means with a diagonal metric: the codebook learner of EDSG (spec §6.2-6.4).

Objective for points t_l ∈ R^d with per-coordinate weights ω_l ∈ R^d_{≥0}:

    J(C, a) = Σ_l Σ_i ω_{l,i} (t_{l,i} − C_{a_l,i})²

Assignment is brute force over all centroids in chunks (K ≤ 2^16, d small); the update is the
closed-form weighted mean per coordinate (the exact minimiser for fixed assignments). Empty
clusters are re-seeded from the worst-fitting points.
"""

from __future__ import annotations

import torch

from rsavq_core.progress import check_stop

_CHUNK_ELEMENTS = 1 << 23  # bound the [chunk, K] distance matrix to ~32 MB of float32


def search_table(centroids: torch.Tensor) -> torch.Tensor:
    """[K, d] float32 centroids -> [2d, K] float32: what ``assign`` multiplies with, [c, c²]ᵀ.

    Σ_i ω(t − c)² = Σ ω t² + [−2ω⊙t, ω]·[c, c²]: one matmul with a 2d-long inner dimension, and
    the first term is constant per point, so the argmin needs only the matmul (d is tiny, K is not).
    A caller that searches one codebook many times (the column loop) builds this once.
    """
    return torch.cat([centroids, centroids * centroids], 1).T.contiguous()


def assign(
    points: torch.Tensor,
    weights: torch.Tensor | None,
    centroids: torch.Tensor,
    table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid under the weighted metric.

    Args:
        points: [L, d] float32.
        weights: [L, d] float32 non-negative, or None for the Euclidean metric.
        centroids: [K, d] float32.
        table: ``search_table(centroids)`` [2d, K] float32 when the caller keeps it, else None.
    Returns:
        (codes [L] int64, per-point distance [L] float32).
    """
    n, k = points.shape[0], centroids.shape[0]
    chunk = max(1, _CHUNK_ELEMENTS // max(k, 1))
    codes = torch.empty(n, dtype=torch.long, device=points.device)
    dist = torch.empty(n, dtype=points.dtype, device=points.device)
    book = search_table(centroids) if table is None else table
    for s in range(0, n, chunk):
        t = points[s : s + chunk]
        w = weights[s : s + chunk] if weights is not None else torch.ones_like(t)
        best, idx = torch.cat([-2 * w * t, w], 1).matmul(book).min(1)
        codes[s : s + chunk] = idx
        dist[s : s + chunk] = (best + (w * t * t).sum(1)).clamp_min_(0)
    return codes, dist


def update(
    points: torch.Tensor, weights: torch.Tensor | None, codes: torch.Tensor, centroids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form weighted centroids; returns (new centroids [K, d], empty-cluster mask [K] bool).

    A coordinate whose cluster has zero total weight keeps its previous value.
    """
    k, d = centroids.shape
    w = weights if weights is not None else torch.ones_like(points)
    num = torch.zeros(k, d, dtype=points.dtype, device=points.device).index_add_(0, codes, w * points)
    den = torch.zeros(k, d, dtype=points.dtype, device=points.device).index_add_(0, codes, w)
    counts = torch.bincount(codes, minlength=k)
    new = torch.where(den > 0, num / den.clamp_min(1e-30), centroids)
    return new, counts == 0


def init_plusplus(
    points: torch.Tensor, weights: torch.Tensor | None, k: int, generator: torch.Generator, sample: int = 16384
) -> torch.Tensor:
    """k-means++ seeding on a random subsample (≤ max(sample, 4K) points). Returns [K, d] float32.

    points: [L, d] float32; weights: [L, d] float32 or None (the seeding uses their row means).
    """
    n = points.shape[0]
    if n <= k:
        # Fewer points than centroids: every point is a centroid; the codebook keeps its fixed size
        # 2^(b·d), so the rest are copies (they are never worse than leaving entries unused).
        reps = torch.arange(k, device=points.device) % max(n, 1)
        return points[reps].clone()
    pick = torch.randperm(n, generator=generator)[: min(n, max(sample, 4 * k))].to(points.device)
    pts = points[pick]
    w = weights[pick].mean(1) if weights is not None else torch.ones(len(pick), device=points.device)
    uniforms = torch.rand(k, generator=generator, dtype=torch.float64)
    chosen = torch.empty(k, dtype=torch.long)
    best = torch.full((len(pick),), float("inf"), device=points.device)
    prob = w.double() + 1e-12
    for i in range(k):
        # Inverse-CDF sampling (cheaper than torch.multinomial in a loop of K steps).
        cdf = torch.cumsum(prob, 0)
        nxt = int(torch.searchsorted(cdf, uniforms[i].to(cdf.device) * cdf[-1]).clamp_max(len(pick) - 1))
        chosen[i] = nxt
        best = torch.minimum(best, ((pts - pts[nxt]) ** 2).sum(1))
        prob = (best * w).double()
        if float(prob.sum()) <= 0:  # every sampled point already coincides with a centroid
            prob = torch.ones_like(prob)
    return pts[chosen.to(points.device)].clone()


def weighted_kmeans(
    points: torch.Tensor,
    weights: torch.Tensor | None,
    k: int,
    iters: int,
    generator: torch.Generator,
    *,
    fit_points: int = 0,
    assign_points: torch.Tensor | None = None,
    assign_weights: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Lloyd iterations of the weighted objective; returns centroids [K, d] float32.

    Args:
        points: [L, d] float32 targets t_l the centroids are fitted to.
        weights: [L, d] float32 metric weights ω_l (None: Euclidean).
        k: number of centroids K.
        iters: number of assignment + closed-form update rounds T.
        fit_points: when > 0 and L is larger, the T rounds run on a random subsample of
            max(fit_points, 8·K) points [I: the paper gives no T or sample size]; one final
            assignment + update over all L points follows, so every point shapes the codebook.
        assign_points / assign_weights: what the assignment step compares against when it differs
            from the update's targets (Alg. 1 literal: unshifted W, Euclidean). [L, d] / [L, d] or None.
        init: [K, d] float32 initial centroids (default: k-means++ on the fitting sample).
    The caller assigns the final codes (after rounding the codebook to its storage precision).
    """
    a_pts = points if assign_points is None else assign_points
    a_w = weights if assign_points is None else assign_weights
    n = points.shape[0]
    sample = max(fit_points, 8 * k)
    if 0 < fit_points and sample < n:
        pick = torch.randperm(n, generator=generator)[:sample].to(points.device)
        fit = (
            points[pick],
            None if weights is None else weights[pick],
            a_pts[pick],
            None if a_w is None else a_w[pick],
        )
    else:
        fit = (points, weights, a_pts, a_w)
    centroids = init.clone() if init is not None else init_plusplus(fit[0], fit[1], k, generator)
    for _ in range(iters):
        check_stop()  # a cancelled job stops between rounds, not after the layer
        centroids = _lloyd_step(*fit, centroids)
    if fit[0] is not points:
        centroids = _lloyd_step(points, weights, a_pts, a_w, centroids)
    return centroids


def _lloyd_step(
    points: torch.Tensor,
    weights: torch.Tensor | None,
    a_pts: torch.Tensor,
    a_w: torch.Tensor | None,
    centroids: torch.Tensor,
) -> torch.Tensor:
    """One assignment + closed-form update; empty clusters re-seeded at the worst-fitting points."""
    codes, dist = assign(a_pts, a_w, centroids)
    centroids, empty = update(points, weights, codes, centroids)
    if empty.any():
        worst = torch.topk(dist, min(int(empty.sum()), dist.numel())).indices
        centroids[empty.nonzero().squeeze(1)[: len(worst)]] = points[worst]
    return centroids
