"""Natural gradient and channel sensitivity from Kronecker factors, against dense linear algebra."""

from __future__ import annotations

import pytest
import torch

from rsavq_core.algorithms.sensitivity import channel_sensitivity, damp, fisher_diag_metric, natural_gradient
from rsavq_core.calibration.statistics import LayerStats
from rsavq_core.errors import CalibrationError

M, N = 6, 5
ALPHA = 0.01


def spd(n: int, gen: torch.Generator, cond: float = 1.0) -> torch.Tensor:
    a = torch.randn(n, n + 2, generator=gen, dtype=torch.float64)
    return a @ a.T / (n + 2) + cond * 0.05 * torch.eye(n, dtype=torch.float64)


def make_stats(seed: int = 0, tau: float = 2.5) -> LayerStats:
    gen = torch.Generator().manual_seed(seed)
    return LayerStats(
        grad_mean=torch.randn(M, N, generator=gen).float(),
        fisher_out=spd(M, gen).float(),
        fisher_in=spd(N, gen).float(),
        tau=tau,
        hessian=None,
        n_samples=4,
        n_tokens=64,
    )


def damped(factor: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    f = factor.double()
    return f + alpha * float(f.diagonal().mean()) * torch.eye(f.shape[0], dtype=torch.float64)


def vec(x: torch.Tensor) -> torch.Tensor:
    """Column-major vectorisation."""
    return x.T.reshape(-1)


def unvec(v: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return v.reshape(cols, rows).T


def test_vec_convention() -> None:
    # vec(A X B) = (Bᵀ ⊗ A) vec(X): the identity the spec's normalisation relies on.
    gen = torch.Generator().manual_seed(3)
    a, x, b = (torch.randn(s, generator=gen, dtype=torch.float64) for s in ((M, M), (M, N), (N, N)))
    torch.testing.assert_close(vec(a @ x @ b), torch.kron(b.T.contiguous(), a) @ vec(x))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_natural_gradient_is_dense_kronecker_solve(seed: int) -> None:
    stats = make_stats(seed)
    fisher = damp(stats, ALPHA)
    nat = natural_gradient(stats, fisher)
    assert nat.shape == (M, N) and nat.dtype == torch.float32
    assert stats.grad_mean is not None and stats.fisher_out is not None and stats.fisher_in is not None
    fo, fi = damped(stats.fisher_out), damped(stats.fisher_in)
    dense = torch.kron(fi, fo)  # (F̃_I ⊗ F̃_O), column-major vec
    expected = unvec(stats.tau * torch.linalg.solve(dense, vec(stats.grad_mean.double())), M, N)
    torch.testing.assert_close(nat.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    # natural gradient is a descent-compatible direction: ⟨Ḡ, ñ⟩ > 0
    assert float((stats.grad_mean * nat).sum()) > 0


def test_damping_is_relative_to_mean_diagonal() -> None:
    stats = make_stats(4)
    fisher = damp(stats, 0.3)
    assert stats.fisher_out is not None and stats.fisher_in is not None
    torch.testing.assert_close(fisher.diag_out, damped(stats.fisher_out, 0.3).diagonal())
    torch.testing.assert_close(fisher.diag_in, damped(stats.fisher_in, 0.3).diagonal())
    torch.testing.assert_close(fisher.chol_out @ fisher.chol_out.T, damped(stats.fisher_out, 0.3))
    assert fisher.tau == stats.tau
    # Damping changes ñ (it is not silently ignored).
    assert not torch.allclose(natural_gradient(stats, damp(stats, 0.3)), natural_gradient(stats, damp(stats, ALPHA)))


@pytest.mark.parametrize("seed", [0, 5])
def test_inverse_sensitivity_is_dense(seed: int) -> None:
    stats = make_stats(seed, tau=1.7)
    fisher = damp(stats, ALPHA)
    sens = channel_sensitivity(stats, fisher, "inverse")
    assert sens.shape == (N,) and sens.dtype == torch.float32
    assert stats.grad_mean is not None and stats.fisher_out is not None and stats.fisher_in is not None
    fo, fi = damped(stats.fisher_out), damped(stats.fisher_in)
    g = stats.grad_mean.double()
    for c in range(N):
        f_c = fi[c, c] * fo / stats.tau  # M×M diagonal block of F̃ = (F̃_I ⊗ F̃_O)/τ for column c
        assert torch.allclose(f_c, torch.kron(fi, fo)[c * M : (c + 1) * M, c * M : (c + 1) * M] / stats.tau)
        expected = 0.5 * g[:, c] @ torch.linalg.solve(f_c, g[:, c])
        assert float(sens[c]) == pytest.approx(float(expected), rel=1e-5)
        # = ½ ñ_cᵀ F_c ñ_c with the per-channel natural gradient ñ_c = F_c⁻¹ g_c (Alg. 1 line 5)
        nat_c = torch.linalg.solve(f_c, g[:, c])
        assert float(sens[c]) == pytest.approx(float(0.5 * nat_c @ f_c @ nat_c), rel=1e-5)


def test_direct_sensitivity_uses_undamped_factors() -> None:
    stats = make_stats(7, tau=0.8)
    fisher = damp(stats, 0.5)  # large damping: would show if the damped factors were used
    sens = channel_sensitivity(stats, fisher, "direct")
    assert stats.grad_mean is not None and stats.fisher_out is not None and stats.fisher_in is not None
    fo, fi, g = stats.fisher_out.double(), stats.fisher_in.double(), stats.grad_mean.double()
    for c in range(N):
        f_c = fi[c, c] * fo / stats.tau
        assert float(sens[c]) == pytest.approx(float(0.5 * g[:, c] @ f_c @ g[:, c]), rel=1e-5)


def test_sensitivity_scales_with_gradient_squared_and_orders_channels() -> None:
    stats = make_stats(8)
    assert stats.grad_mean is not None
    g = stats.grad_mean.clone()
    g[:, 2] *= 10.0
    boosted = LayerStats(g, stats.fisher_out, stats.fisher_in, stats.tau, None, 4, 64)
    for form in ("inverse", "direct"):
        base = channel_sensitivity(stats, damp(stats, ALPHA), form)
        new = channel_sensitivity(boosted, damp(boosted, ALPHA), form)
        assert float(new[2]) == pytest.approx(100 * float(base[2]), rel=1e-4)
        torch.testing.assert_close(new[[0, 1, 3, 4]], base[[0, 1, 3, 4]])


def test_unknown_form() -> None:
    stats = make_stats()
    with pytest.raises(CalibrationError, match="unknown sensitivity form"):
        channel_sensitivity(stats, damp(stats, ALPHA), "sideways")


@pytest.mark.parametrize("which", ["fisher_out", "fisher_in"])
@pytest.mark.parametrize("bad", ["zero", "nan"])
def test_degenerate_factor_raises(which: str, bad: str) -> None:
    stats = make_stats()
    factor = getattr(stats, which)
    setattr(stats, which, torch.zeros_like(factor) if bad == "zero" else factor.clone().fill_(float("nan")))
    with pytest.raises(CalibrationError, match="degenerate"):
        damp(stats, ALPHA)


def test_indefinite_factor_is_repaired_by_more_damping() -> None:
    stats = make_stats()
    assert stats.fisher_out is not None
    fo = stats.fisher_out.clone()
    fo[0, 0] = -0.2 * float(fo.diagonal().mean())  # indefinite, positive mean diagonal
    stats.fisher_out = fo
    fisher = damp(stats, ALPHA)
    assert torch.isfinite(fisher.chol_out).all()
    assert float(fisher.diag_out[0]) > 0


def test_hessian_only_statistics_raise() -> None:
    stats = LayerStats(None, None, None, 0.0, torch.eye(N), 4, 64)
    with pytest.raises(CalibrationError, match="no gradients"):
        damp(stats, ALPHA)


def test_fisher_diag_metric() -> None:
    stats = make_stats(9, tau=3.0)
    fisher = damp(stats, ALPHA)
    omega = fisher_diag_metric(fisher)
    assert stats.fisher_out is not None and stats.fisher_in is not None
    assert omega.shape == (M, N) and omega.dtype == torch.float32
    assert float(omega.mean()) == pytest.approx(1.0, rel=1e-6)
    expected = torch.outer(damped(stats.fisher_out).diagonal(), damped(stats.fisher_in).diagonal()) / stats.tau
    ratio = omega.double() / expected
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio.mean())), rtol=1e-6, atol=0)
