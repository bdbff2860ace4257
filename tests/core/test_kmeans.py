"""Weighted k-means with a diagonal metric: assignment, closed-form update, Lloyd descent, edge cases."""

from __future__ import annotations

import pytest
import torch

from rsavq_core.algorithms import kmeans
from rsavq_core.algorithms.kmeans import assign, init_plusplus, update, weighted_kmeans


def data(n: int = 300, d: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    points = torch.randn(n, d, generator=gen) * torch.tensor([1.0, 3.0, 0.5])[:d]
    weights = torch.rand(n, d, generator=gen) * 2 + 0.05
    return points, weights


def brute(points: torch.Tensor, weights: torch.Tensor | None, cents: torch.Tensor) -> torch.Tensor:
    """[L, K] weighted squared distances in float64."""
    w = torch.ones_like(points) if weights is None else weights
    diff = points.double()[:, None, :] - cents.double()[None, :, :]
    return (w.double()[:, None, :] * diff**2).sum(-1)


def objective(points: torch.Tensor, weights: torch.Tensor | None, cents: torch.Tensor, codes: torch.Tensor) -> float:
    w = torch.ones_like(points) if weights is None else weights
    return float((w.double() * (points.double() - cents.double()[codes]) ** 2).sum())


@pytest.mark.parametrize("weighted", [True, False])
def test_assign_matches_brute_force(weighted: bool) -> None:
    points, weights = data()
    gen = torch.Generator().manual_seed(1)
    cents = torch.randn(17, 3, generator=gen) * 2
    w = weights if weighted else None
    codes, dist = assign(points, w, cents)
    full = brute(points, w, cents)
    best, idx = full.min(1)
    assert codes.dtype == torch.int64 and codes.shape == (300,)
    # Ties aside, the argmin agrees; either way the chosen centroid attains the minimum distance.
    torch.testing.assert_close(full.gather(1, codes[:, None])[:, 0], best, rtol=1e-5, atol=1e-5)
    assert float((codes == idx).float().mean()) > 0.99
    torch.testing.assert_close(dist.double(), best, rtol=1e-4, atol=1e-4)


def test_assign_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    points, weights = data(101)
    cents = torch.randn(7, 3, generator=torch.Generator().manual_seed(2))
    whole = assign(points, weights, cents)
    monkeypatch.setattr(kmeans, "_CHUNK_ELEMENTS", 7 * 5)  # chunks of 5 points, last one partial
    chunked = assign(points, weights, cents)
    assert torch.equal(whole[0], chunked[0])
    torch.testing.assert_close(whole[1], chunked[1])


def test_weights_change_the_assignment() -> None:
    points = torch.tensor([[1.0, 1.0]])
    cents = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # both at Euclidean distance 1
    assert int(assign(points, torch.tensor([[10.0, 1.0]]), cents)[0]) == 1  # x matters: pick the x-exact one
    assert int(assign(points, torch.tensor([[1.0, 10.0]]), cents)[0]) == 0


def test_update_is_weighted_mean() -> None:
    points, weights = data(200)
    k = 6
    codes = torch.randint(0, k, (200,), generator=torch.Generator().manual_seed(3))
    codes[codes == 5] = 4  # cluster 5 is empty
    old = torch.full((k, 3), 7.0)
    new, empty = update(points, weights, codes, old)
    assert empty.tolist() == [False] * 5 + [True]
    for c in range(5):
        sel = codes == c
        expected = (weights[sel] * points[sel]).sum(0) / weights[sel].sum(0)
        torch.testing.assert_close(new[c], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(new[5], old[5])  # empty cluster keeps its previous value
    # Unweighted: plain mean.
    plain, _ = update(points, None, codes, old)
    torch.testing.assert_close(plain[0], points[codes == 0].mean(0), rtol=1e-5, atol=1e-6)


def test_update_minimises_objective_for_fixed_codes() -> None:
    points, weights = data(150)
    codes = torch.randint(0, 4, (150,), generator=torch.Generator().manual_seed(4))
    new, _ = update(points, weights, codes, torch.zeros(4, 3))
    base = objective(points, weights, new, codes)
    for _ in range(10):
        jitter = new + 0.01 * torch.randn_like(new)
        assert objective(points, weights, jitter, codes) >= base


def test_zero_weight_coordinate_keeps_previous_value() -> None:
    points = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    weights = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    new, empty = update(points, weights, torch.tensor([0, 0]), torch.tensor([[9.0, 9.0]]))
    assert new.tolist() == [[2.0, 9.0]] and not bool(empty.any())


@pytest.mark.parametrize("weighted", [True, False])
def test_lloyd_objective_is_non_increasing(weighted: bool) -> None:
    points, weights = data(400, seed=5)
    w = weights if weighted else None
    init = points[:12].clone() + 0.3  # deliberately poor start
    values = []
    for iters in range(0, 6):
        cents = weighted_kmeans(points, w, 12, iters, torch.Generator().manual_seed(0), init=init)
        codes = assign(points, w, cents)[0]
        values.append(objective(points, w, cents, codes))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(values, values[1:])), values
    assert values[-1] < 0.9 * values[0]


def test_empty_clusters_are_reseeded() -> None:
    points, weights = data(100, seed=6)
    init = torch.cat([points[:4].clone(), torch.full((4, 3), 1e4)])  # last 4 centroids attract nothing
    cents = weighted_kmeans(points, weights, 8, 1, torch.Generator().manual_seed(0), init=init)
    codes = assign(points, weights, cents)[0]
    assert torch.isfinite(cents).all()
    assert bool((cents.abs() < 1e3).all())  # the far-away centroids were moved onto the data
    for c in cents[4:]:
        assert bool((points == c).all(1).any())  # re-seeded exactly at data points
    # and they help: the objective is below the one with the 4 useful centroids alone
    cents4 = weighted_kmeans(points, weights, 4, 1, torch.Generator().manual_seed(0), init=init[:4])
    codes4 = assign(points, weights, cents4)[0]
    assert objective(points, weights, cents, codes) < objective(points, weights, cents4, codes4)


@pytest.mark.parametrize("n", [1, 5, 8])
def test_fewer_points_than_centroids(n: int) -> None:
    points, weights = data(n, seed=7)
    cents = weighted_kmeans(points, weights, 8, 3, torch.Generator().manual_seed(0))
    codes = assign(points, weights, cents)[0]
    assert cents.shape == (8, 3) and codes.shape == (n,)
    assert torch.isfinite(cents).all()
    torch.testing.assert_close(cents[codes], points)  # every point is represented exactly
    init = init_plusplus(points, weights, 8, torch.Generator().manual_seed(0))
    assert init.shape == (8, 3)


def test_plusplus_picks_distinct_points() -> None:
    points, weights = data(500, seed=8)
    init = init_plusplus(points, weights, 16, torch.Generator().manual_seed(0))
    assert init.shape == (16, 3)
    assert len({tuple(r.tolist()) for r in init}) == 16
    for c in init:
        assert bool((points == c).all(1).any())


def test_deterministic_with_the_same_seed() -> None:
    points, weights = data(600, seed=9)
    for fit_points in (0, 100):
        a = weighted_kmeans(points, weights, 32, 4, torch.Generator().manual_seed(42), fit_points=fit_points)
        b = weighted_kmeans(points, weights, 32, 4, torch.Generator().manual_seed(42), fit_points=fit_points)
        c = weighted_kmeans(points, weights, 32, 4, torch.Generator().manual_seed(43), fit_points=fit_points)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_subsampled_fit() -> None:
    points, weights = data(3000, seed=11)
    k = 16
    full = weighted_kmeans(points, weights, k, 5, torch.Generator().manual_seed(0))
    # fit_points >= L (or 0) means every round uses all points: identical results
    same = weighted_kmeans(points, weights, k, 5, torch.Generator().manual_seed(0), fit_points=5000)
    assert torch.equal(full, same)
    # A subsample of max(fit_points, 8K) = 200 points, then one round on all 3000 points: a
    # codebook of similar quality, and each centroid is the weighted mean of some cluster of all
    # points (the last update saw every point).
    sub = weighted_kmeans(points, weights, k, 5, torch.Generator().manual_seed(0), fit_points=50)
    assert torch.isfinite(sub).all() and not torch.equal(sub, full)
    j_full = objective(points, weights, full, assign(points, weights, full)[0])
    j_sub = objective(points, weights, sub, assign(points, weights, sub)[0])
    assert j_sub < 1.25 * j_full
    # Only 200 points of the sample could seed the centroids; after the final full round they move off them.
    on_points = sum(bool((points == c).all(1).any()) for c in sub)
    assert on_points < k


def test_assign_points_differ_from_targets() -> None:
    """Alg. 1 literal mode: assign the unshifted points, fit centroids to the shifted targets."""
    points, _ = data(200, seed=10)
    shifted = points + 5.0
    init = points[:4].clone()
    cents = weighted_kmeans(
        shifted, None, 4, 1, torch.Generator().manual_seed(0), assign_points=points, assign_weights=None, init=init
    )
    first = assign(points, None, init)[0]
    for c in range(4):
        sel = first == c
        if sel.any():
            torch.testing.assert_close(cents[c], shifted[sel].mean(0))
