"""The least-squares codebook update (algorithms/codebook_update.py): it reaches the exact minimiser
of tr(ΔW H ΔWᵀ) for fixed codes, keeps the codes, and the pipeline option uses it."""

from __future__ import annotations

import pytest
import torch

from rsavq_core.algorithms.codebook_update import least_squares_codebooks
from rsavq_core.algorithms.vq import quantize_vq
from rsavq_core.calibration.statistics import LayerStats
from rsavq_core.config.quant_config import QuantConfig
from tests.core.test_vq import correlated_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, LayerStats]:
    gen = torch.Generator().manual_seed(seed)
    m, n = 36, 24
    w = torch.randn(m, n, generator=gen) * 0.1
    x = correlated_inputs(512, n, gen, rho=0.9)
    h = x.T @ x / 512
    return w, h, LayerStats(None, None, None, 0.0, h, 8, 512, hessian_first=x[::64].T @ x[::64] / 8)


def _exact_books(layer, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The minimiser by the normal equations, built column by column of the selection operator S."""
    books = [g.codebooks.double() for g in layer.groups]
    sizes = [b.numel() for b in books]
    columns = []
    for j in range(sum(sizes)):
        flat = torch.zeros(sum(sizes), dtype=torch.float64)
        flat[j] = 1.0
        parts = list(torch.split(flat, sizes))
        columns.append(layer.dequantize_books([p.view_as(b) for p, b in zip(parts, books)]).reshape(-1))
    s = torch.stack(columns, 1)  # [M*N, K_total]: vec(Ŵ) = S c
    big_h = torch.kron(torch.eye(w.shape[0], dtype=torch.float64), h.double())  # vec(ΔW H ΔWᵀ) row-major
    a = s.T @ big_h @ s
    b = s.T @ big_h @ w.double().reshape(-1)
    used = a.diagonal() > 0  # entries no code selects stay out of the system
    c = torch.zeros(sum(sizes), dtype=torch.float64)
    c[used] = torch.linalg.solve(a[used][:, used], b[used])
    return (s @ c).view_as(w)


def test_reaches_the_least_squares_minimiser_with_codes_fixed() -> None:
    w, h, stats = _problem()
    cfg = QuantConfig.for_method("kmeans", bits=2, vector_len=4, n_pq=2, n_groups=2, kmeans_iters=3)
    layer, _ = quantize_vq(w, stats, cfg)
    codes = [g.indices.clone() for g in layer.groups]
    exact = _exact_books(layer, w, h)
    result = least_squares_codebooks(layer, w, h, iters=200, damping=0.0)
    assert result["kept"] == 1.0 and result["after"] < result["before"]
    assert all(torch.equal(g.indices, c) for g, c in zip(layer.groups, codes))  # codes untouched
    got = layer.dequantize().double()

    def err(x: torch.Tensor) -> float:
        d = x - w.double()
        return float(((d @ h.double()) * d).sum())

    # the fp16 rounding of the stored codebook is all that separates it from the exact minimiser
    assert err(got) == pytest.approx(err(exact), rel=2e-3)
    assert err(got) < 0.9 * err(quantize_vq(w, stats, cfg)[0].dequantize().double())


def test_refit_output_option_lowers_the_output_error_over_compensation() -> None:
    w, _, stats = _problem(seed=4)
    base = QuantConfig.for_method("kmeans", bits=2, vector_len=4, n_pq=2, n_groups=2, kmeans_iters=3, compensate=True)
    _, mean_report = quantize_vq(w, stats, base)
    _, output_report = quantize_vq(w, stats, base.replace(refit="output"))
    assert output_report.refit is not None and output_report.refit["kept"] == 1.0
    assert output_report.hessian_error is not None and mean_report.hessian_error is not None
    assert output_report.hessian_error < mean_report.hessian_error
    assert QuantConfig.for_method("rsavq", bits=2, refit="output").needs_hessian()


def test_a_result_that_does_not_improve_is_not_kept() -> None:
    w, h, stats = _problem(seed=5)
    cfg = QuantConfig.for_method("kmeans", bits=2, vector_len=4, n_pq=2, n_groups=2, kmeans_iters=3)
    layer, _ = quantize_vq(w, stats, cfg)
    books = [g.codebooks.clone() for g in layer.groups]
    unchanged = least_squares_codebooks(layer, w, h, iters=0)  # no step: the error cannot fall
    assert unchanged["kept"] == 0.0 and unchanged["after"] == unchanged["before"]
    assert all(torch.equal(g.codebooks, b) for g, b in zip(layer.groups, books))
