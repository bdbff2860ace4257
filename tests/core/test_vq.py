"""quantize_vq on fabricated statistics: layout, codebook sizes, EDSG direction, compensation, reports."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from rsavq_core.algorithms.sensitivity import damp, natural_gradient
from rsavq_core.algorithms.vq import LayerReport, quantize_vq
from rsavq_core.algorithms.vq_options import VQOptions
from rsavq_core.calibration.statistics import LayerStats
from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.errors import CalibrationError, UnsupportedShapeError
from rsavq_core.formats.vq_layer import VQLayer, to_subvectors

pytestmark = pytest.mark.usefixtures("one_thread")


def spd(n: int, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    a = torch.randn(n, 2 * n, generator=gen)
    return scale * (a @ a.T / (2 * n) + 0.1 * torch.eye(n))


def correlated_inputs(tokens: int, n: int, gen: torch.Generator, rho: float = 0.9) -> torch.Tensor:
    """[tokens, n] activations whose channels share a strong common component (correlation ~ rho)."""
    common = torch.randn(tokens, 1, generator=gen)
    mix = torch.randn(tokens, n, generator=gen)
    scales = 0.5 + torch.rand(n, generator=gen)
    return (math.sqrt(rho) * common + math.sqrt(1 - rho) * mix) * scales


def fabricate(m: int, n: int, seed: int = 0, hessian: bool = True) -> tuple[torch.Tensor, LayerStats]:
    """A weight [m, n] and LayerStats with realistic scales (tiny gradients, τ ~ tr F)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=gen) * 0.1
    g = torch.randn(m, n, generator=gen) * 1e-3
    fo, fi = spd(m, gen, 1e-6), spd(n, gen, 1e-6)
    x = correlated_inputs(256, n, gen)
    stats = LayerStats(
        grad_mean=g,
        fisher_out=fo,
        fisher_in=fi,
        tau=float(fo.trace()),
        hessian=(x.T @ x / 256) if hessian else None,
        n_samples=8,
        n_tokens=256,
        hessian_first=(x[::32].T @ x[::32] / 8) if hessian else None,  # 8 windows of 32 tokens
    )
    return w, stats


SMALL: dict[str, Any] = dict(bits=2, vector_len=6, n_pq=2, n_groups=2, kmeans_iters=3)
CONFIGS = {
    "kmeans": QuantConfig.for_method("kmeans", **SMALL),
    "rsavq_uniform": QuantConfig.for_method("rsavq", allocation="uniform", **SMALL),
    "rsavq_proportional": QuantConfig.for_method("rsavq", allocation="proportional", **SMALL),
    "rsavq_additive_direct": QuantConfig.for_method("rsavq", allocation="additive", sensitivity="direct", **SMALL),
    "rsavq_compensate": QuantConfig.for_method("rsavq", compensate=True, **SMALL),
    "rsavq_paper_assign": QuantConfig.for_method("rsavq", assign="paper", **SMALL),
    "rsavq_hessian_metric": QuantConfig.for_method("rsavq", metric="hessian", **SMALL),
    "rsavq_raw_lambda": QuantConfig.for_method("rsavq", lam_scale="raw", lam=1e-7, **SMALL),
    "rsavq_row_scales": QuantConfig.for_method("rsavq", row_scales=True, compensate=True, **SMALL),
}


def check_layer(layer: VQLayer, cfg: QuantConfig, m: int, n: int) -> None:
    options = cfg.options_as(VQOptions)
    d = options.sub_dim
    n_vec = -(-m // options.vector_length)
    assert (layer.out_features, layer.in_features, layer.vector_len, layer.n_pq) == (
        m,
        n,
        options.vector_len,
        options.n_pq,
    )
    assert sorted(layer.perm.tolist()) == list(range(n))
    assert layer.groups[0].start == 0 and layer.groups[-1].stop == n
    for a, b in zip(layer.groups, layer.groups[1:]):
        assert a.stop == b.start and a.bits >= b.bits
    lo, hi = options.group_bit_range(cfg.bits)
    total = 0
    for g in layer.groups:
        assert lo <= g.bits <= hi
        assert g.codebooks.dtype == torch.float16
        assert tuple(g.codebooks.shape) == (options.n_pq, 2 ** (g.bits * d), d)
        assert torch.isfinite(g.codebooks).all()
        assert g.indices.dtype == torch.int64 and tuple(g.indices.shape) == (g.stop - g.start, n_vec, options.n_pq)
        assert int(g.indices.min()) >= 0 and int(g.indices.max()) < 2 ** (g.bits * d)
        total += g.bits * (g.stop - g.start)
    assert total <= cfg.bits * n + 1e-9


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_quantize_small_layer(name: str) -> None:
    cfg = CONFIGS[name]
    w, stats = fabricate(12, 10, seed=1)
    bias = torch.randn(12)
    layer, report = quantize_vq(w, None if name == "kmeans" else stats, cfg, bias=bias)
    check_layer(layer, cfg, 12, 10)
    deq = layer.dequantize()
    assert deq.shape == (12, 10) and deq.dtype == torch.float32 and torch.isfinite(deq).all()
    assert layer.bias is not None and layer.bias.dtype == torch.float16
    torch.testing.assert_close(layer.bias.float(), bias.half().float())
    # Quantization does something sensible: the error is smaller than the weight itself.
    assert float((deq - w).norm()) < float(w.norm())
    assert isinstance(report, LayerReport)
    assert report.bits == [g.bits for g in layer.groups]
    for value in (report.proxy_error, report.step_ratio, report.seconds):
        assert math.isfinite(value) and value >= 0
    assert 0 < report.proxy_error < 1
    if name == "kmeans":
        assert report.hessian_error is None and report.step_ratio == 0.0 and report.sensitivity == {}
    else:
        assert report.hessian_error is not None and math.isfinite(report.hessian_error) and report.hessian_error > 0
    if "uniform" in name or name == "kmeans":
        assert torch.equal(layer.perm, torch.arange(10))
    if name in ("rsavq_proportional", "rsavq_additive_direct"):
        assert set(report.sensitivity) == {"min", "median", "max"}
        assert all(math.isfinite(v) for v in report.sensitivity.values())
        assert report.sensitivity["min"] <= report.sensitivity["median"] <= report.sensitivity["max"]
    options = cfg.options_as(VQOptions)
    if options.lam > 0 and options.lam_scale == "relative":
        assert report.step_ratio == pytest.approx(options.lam, rel=1e-5)


def test_report_errors_match_their_definitions() -> None:
    cfg = CONFIGS["rsavq_uniform"]
    w, stats = fabricate(24, 16, seed=2)
    layer, report = quantize_vq(w, stats, cfg)
    delta = layer.dequantize() - w
    h = stats.hessian
    assert h is not None
    assert report.hessian_error == pytest.approx(float(((delta @ h) * delta).sum() / ((w @ h) * w).sum()), rel=1e-4)
    fisher = damp(stats, cfg.options_as(VQOptions).damping)
    omega = torch.outer(fisher.diag_out, fisher.diag_in).float()
    assert report.proxy_error == pytest.approx(float((omega * delta**2).sum() / (omega * w**2).sum()), rel=1e-4)


def test_rows_not_divisible_by_vector_len() -> None:
    cfg = QuantConfig.for_method("rsavq", bits=2, vector_len=6, n_pq=2, n_groups=2, kmeans_iters=3)
    w, stats = fabricate(10, 8, seed=3)
    for config, st in (
        (cfg, stats),
        (QuantConfig.for_method("kmeans", **{**SMALL, "n_groups": 2}), None),
        (cfg.replace(compensate=True), stats),
    ):
        layer, report = quantize_vq(w, st, config)
        check_layer(layer, config, 10, 8)
        assert layer.n_vectors == 2
        deq = layer.dequantize()
        assert deq.shape == (10, 8) and torch.isfinite(deq).all()
        assert math.isfinite(report.proxy_error) and report.proxy_error < 1


def test_padding_rows_do_not_pull_codebooks() -> None:
    # M = 7 with v = 2 (d = 1): one padded zero row. A weight of large constant values must be
    # represented exactly by 2-bit scalar codebooks; zero padding rows would drag a centroid to 0.
    w = torch.tensor([[5.0, -5.0], [5.0, -5.0]]).repeat(4, 1)[:7]
    cfg = QuantConfig.for_method("kmeans", bits=1, vector_len=2, n_pq=2, n_groups=1, kmeans_iters=3)
    layer, _ = quantize_vq(w, None, cfg)
    torch.testing.assert_close(layer.dequantize(), w)


def test_to_subvectors_layout() -> None:
    # Vectors run down the rows of one column; sub-vector p holds rows p*d .. p*d+d-1 of each vector.
    m = torch.arange(12.0).view(6, 2)  # rows 0..5, columns 0..1
    sub = to_subvectors(m, 6, 2)
    assert sub.shape == (2, 1, 2, 3)
    assert sub[0, 0, 0].tolist() == [0.0, 2.0, 4.0] and sub[0, 0, 1].tolist() == [6.0, 8.0, 10.0]
    assert sub[1, 0, 1].tolist() == [7.0, 9.0, 11.0]


def test_missing_statistics() -> None:
    w, stats = fabricate(12, 10)
    with pytest.raises(CalibrationError, match="gradient statistics"):
        quantize_vq(w, None, CONFIGS["rsavq_uniform"])
    no_h = LayerStats(stats.grad_mean, stats.fisher_out, stats.fisher_in, stats.tau, None, 8, 256)
    with pytest.raises(CalibrationError, match="Hessian"):
        quantize_vq(w, no_h, CONFIGS["rsavq_compensate"])
    with pytest.raises(CalibrationError, match="metric 'hessian'"):
        quantize_vq(w, no_h, CONFIGS["rsavq_hessian_metric"])
    with pytest.raises(UnsupportedShapeError):
        quantize_vq(torch.randn(2, 3, 4), None, CONFIGS["kmeans"])


def test_deterministic() -> None:
    w, stats = fabricate(24, 16, seed=4)
    cfg = CONFIGS["rsavq_proportional"]
    a, _ = quantize_vq(w, stats, cfg)
    b, _ = quantize_vq(w, stats, cfg)
    assert torch.equal(a.dequantize(), b.dequantize())


def test_sensitive_channels_get_more_bits() -> None:
    w, stats = fabricate(24, 16, seed=5)
    assert stats.grad_mean is not None
    g = stats.grad_mean.clone()
    hot = [3, 11, 12, 7]
    g[:, hot] *= 300.0  # four channels with a much larger gradient
    stats = LayerStats(g, stats.fisher_out, stats.fisher_in, stats.tau, stats.hessian, 8, 256)
    knobs: dict[str, Any] = dict(
        bits=2, n_groups=4, kmeans_iters=2, compensate=False, refit="mean", allocation="proportional"
    )
    cfg = QuantConfig.for_method("rsavq", **knobs)
    layer, report = quantize_vq(w, stats, cfg)
    assert set(layer.perm[:4].tolist()) == set(hot)
    assert layer.groups[0].bits > layer.groups[-1].bits
    assert sum(gr.bits * (gr.stop - gr.start) for gr in layer.groups) == 2 * 16
    # dequantize undoes the permutation: the error is small in every original column
    err = (layer.dequantize() - w).norm(dim=0) / w.norm(dim=0)
    assert bool((err < 1).all())


def inner_with_gradient(w: torch.Tensor, stats: LayerStats, cfg: QuantConfig) -> float:
    layer, _ = quantize_vq(w, stats, cfg)
    assert stats.grad_mean is not None
    return float((stats.grad_mean * (layer.dequantize() - w)).sum())


def test_edsg_moves_error_along_negative_natural_gradient() -> None:
    """Spec §6.1: with λ > 0 the first-order loss change ⟨Ḡ, Ŵ − W⟩ is clearly more negative than with λ = 0."""
    base = QuantConfig.for_method(
        "rsavq", bits=2, allocation="uniform", n_groups=2, kmeans_iters=5, compensate=False, refit="mean"
    )
    for seed in range(3):
        w, stats = fabricate(48, 40, seed=10 + seed, hessian=False)
        nat = natural_gradient(stats, damp(stats, base.options_as(VQOptions).damping))
        assert stats.grad_mean is not None
        # what the shift alone would give: ⟨Ḡ, −0.05‖W‖ ñ/‖ñ‖⟩ < 0
        expected = -0.05 * float(w.norm()) * float((stats.grad_mean * nat).sum()) / float(nat.norm())
        assert expected < 0
        zero = inner_with_gradient(w, stats, base.replace(lam=0.0))
        rel = inner_with_gradient(w, stats, base.replace(lam=0.05, lam_scale="relative"))
        lam_raw = 0.05 * float(w.norm()) / float(nat.norm())  # the same step size, expressed as a raw λ
        raw = inner_with_gradient(w, stats, base.replace(lam=lam_raw, lam_scale="raw"))
        # λ = 0: quantization noise, uncorrelated with Ḡ (|.| well below the shift's effect)
        assert abs(zero) < 0.3 * abs(expected)
        for value in (rel, raw):
            assert value < zero + 0.5 * expected  # at least half of the shift's first-order gain
            assert value < 0
        # larger λ, larger gain
        assert inner_with_gradient(w, stats, base.replace(lam=0.15)) < rel


def test_compensation_lowers_hessian_error() -> None:
    gen = torch.Generator().manual_seed(20)
    m, n = 96, 32  # 256 sub-vectors per codebook of 64 entries: a real quantization error
    w = torch.randn(m, n, generator=gen) * 0.1
    x = correlated_inputs(512, n, gen, rho=0.95)
    h = x.T @ x / 512
    stats = LayerStats(None, None, None, 0.0, h, 8, 512, hessian_first=x[::64].T @ x[::64] / 8)
    cfg = QuantConfig.for_method("kmeans", bits=2, n_groups=2, kmeans_iters=5)
    errors = {}
    for compensate in (False, True):
        layer, report = quantize_vq(w, stats, cfg.replace(compensate=compensate))
        delta = layer.dequantize() - w
        errors[compensate] = float(((delta @ h) * delta).sum())
        assert report.hessian_error == pytest.approx(errors[compensate] / float(((w @ h) * w).sum()), rel=1e-4)
        assert report.hessian_error is not None and report.hessian_error > 0.005
    assert errors[True] < 0.6 * errors[False], errors
    # ... and it does so by trading plain (Frobenius) error for output error, not by luck.
    plain = {
        c: float((quantize_vq(w, stats, cfg.replace(compensate=c))[0].dequantize() - w).norm()) for c in (False, True)
    }
    assert plain[True] > plain[False]


def test_effective_budget_counts_codebooks() -> None:
    """At 3 bits a 192x576 layer spends ~1.8 bpw on 512-entry codebooks; an effective budget pays for them."""
    from rsavq_core.checkpoint.bitcount import layer_bits

    torch.manual_seed(0)
    w = torch.randn(192, 576)
    base = QuantConfig.for_method("kmeans", bits=3, n_pq=2, kmeans_iters=1, kmeans_fit_points=512)
    index_layer, _ = quantize_vq(w, None, base)
    eff_layer, _ = quantize_vq(w, None, base.replace(budget="effective"))
    assert layer_bits(index_layer).bpw > 3.5
    eff = layer_bits(eff_layer)
    assert eff.bpw <= 3.0
    # It spends the budget: one more bit anywhere would overflow it.
    assert eff.bpw > 2.5
    assert sum(g.bits for g in eff_layer.groups) < sum(g.bits for g in index_layer.groups)


def test_effective_budget_unreachable_falls_back_to_lowest_bits() -> None:
    w = torch.randn(12, 6)  # codebooks alone exceed 2 bits per weight here
    cfg = QuantConfig.for_method("kmeans", bits=2, kmeans_iters=1, n_groups=2, budget="effective")
    layer, _ = quantize_vq(w, None, cfg)
    lo, _ = cfg.options_as(VQOptions).group_bit_range(cfg.bits)
    assert [g.bits for g in layer.groups] == [lo, lo]


def test_row_scales_fit_rows_of_different_magnitude() -> None:
    """Rows whose magnitudes differ by orders (as LLM output channels do) share one codebook badly;
    with a scale per row the codebooks quantize W / s, and the error in the weight falls."""
    from rsavq_core.checkpoint.bitcount import layer_bits

    gen = torch.Generator().manual_seed(30)
    m, n = 96, 48
    magnitudes = torch.exp(torch.randn(m, 1, generator=gen) * 1.5)
    w = torch.randn(m, n, generator=gen) * 0.05 * magnitudes
    x = correlated_inputs(512, n, gen, rho=0.5)
    stats = LayerStats(None, None, None, 0.0, x.T @ x / 512, 8, 512, hessian_first=x[::64].T @ x[::64] / 8)
    cfg = QuantConfig.for_method("kmeans", bits=2, n_groups=1, kmeans_iters=8, compensate=True, refit="output")
    errors, layers = {}, {}
    for scaled in (False, True):
        layer, report = quantize_vq(w, stats, cfg.replace(row_scales=scaled))
        layers[scaled] = layer
        assert report.hessian_error is not None
        errors[scaled] = report.hessian_error
        assert report.refit is not None and report.refit["after"] <= report.refit["before"]
    assert layers[False].row_scale is None
    scale = layers[True].row_scale
    assert scale is not None and scale.dtype == torch.float16 and scale.shape == (m,)
    rms = w.pow(2).mean(1).sqrt()
    torch.testing.assert_close(scale.float(), rms / rms.mean(), rtol=1e-3, atol=0)  # relative: mean 1
    assert errors[True] < 0.7 * errors[False], errors
    # The scales are stored: 16 bits per output row, counted in the layer's bits.
    extra = layer_bits(layers[True]).total_bits - layer_bits(layers[False]).total_bits
    assert layer_bits(layers[True]).scale_bits == 16 * m and extra == 16 * m


def test_an_effective_budget_pays_for_row_scales() -> None:
    from rsavq_core.algorithms.vq_targets import effective_budget

    cfg = QuantConfig.for_method("kmeans", bits=2, n_pq=2)
    _, plain = effective_budget(192, 576, cfg)
    _, scaled = effective_budget(192, 576, cfg.replace(row_scales=True))
    assert plain - scaled == 16 * 192


def test_row_scales_of_zero_rows_stay_finite() -> None:
    w = torch.randn(12, 10)
    w[3] = 0.0
    layer, _ = quantize_vq(w, None, QuantConfig.for_method("kmeans", bits=2, kmeans_iters=2, row_scales=True))
    assert layer.row_scale is not None and bool((layer.row_scale > 0).all())
    deq = layer.dequantize()
    assert torch.isfinite(deq).all() and float(deq[3].abs().max()) < 1e-3


def test_outliers_are_kept_exact_and_cut_the_error() -> None:
    """A few weights far outside the rest (as LLM layers have) ruin a shared codebook; stored as
    sparse fp16 residuals they come back exactly, and the codebooks serve the rest."""
    from rsavq_core.checkpoint.bitcount import layer_bits

    gen = torch.Generator().manual_seed(31)
    m, n = 96, 48
    w = torch.randn(m, n, generator=gen) * 0.05
    clean = w.clone()
    planted = torch.randperm(m * n, generator=gen)[:60]
    w.view(-1)[planted] = torch.sign(torch.randn(60, generator=gen)) * (0.5 + torch.rand(60, generator=gen))
    x = correlated_inputs(512, n, gen, rho=0.5)
    stats = LayerStats(None, None, None, 0.0, x.T @ x / 512, 8, 512, hessian_first=x[::64].T @ x[::64] / 8)
    share = 70 / (m * n)
    cfg = QuantConfig.for_method("kmeans", bits=2, n_groups=1, kmeans_iters=8, compensate=True, refit="output")
    plain, _ = quantize_vq(w, stats, cfg)
    sparse, report = quantize_vq(w, stats, cfg.replace(outliers=share))
    assert plain.outliers is None and sparse.outliers is not None
    assert sparse.outliers.count == 70 and set(planted.tolist()) <= set(sparse.outliers.index.tolist())
    # One-shot, they are the weights (fp16); under error feedback, the column loop's updated values.
    one_shot, _ = quantize_vq(w, stats, cfg.replace(outliers=share, compensate=False, refit="mean"))
    torch.testing.assert_close(one_shot.dequantize().view(-1)[planted], w.view(-1)[planted], rtol=1e-3, atol=1e-3)
    h = stats.hessian
    assert h is not None

    def out_err(layer: VQLayer, reference: torch.Tensor = w) -> float:
        delta = layer.dequantize() - reference
        return float(((delta @ h) * delta).sum())

    # With the outliers stored, the layer costs what it would without them; without, more.
    baseline = out_err(quantize_vq(clean, stats, cfg)[0], clean)
    assert out_err(sparse) < 1.02 * baseline and baseline < 0.8 * out_err(plain)
    assert report.hessian_error == pytest.approx(out_err(sparse) / float(((w @ h) * w).sum()), rel=1e-4)
    bits = layer_bits(sparse)
    assert bits.outlier_bits == 70 * 48 and bits.total_bits - layer_bits(plain).total_bits == 70 * 48


def test_an_effective_budget_pays_for_outliers() -> None:
    from rsavq_core.algorithms.vq_targets import effective_budget

    cfg = QuantConfig.for_method("kmeans", bits=2, n_pq=2)
    _, plain = effective_budget(192, 576, cfg)
    _, sparse = effective_budget(192, 576, cfg.replace(outliers=0.001))
    assert plain - sparse == int(0.001 * 192 * 576) * 48


@pytest.mark.parametrize("seed", range(4))
def test_outlier_choice_is_the_top_of_a_stable_sort(seed: int) -> None:
    # Saliencies with many ties (small integers) and a NaN: the chosen positions are the first
    # ``count`` of a stable descending sort, NaN last, so a run picks the same outliers everywhere.
    from rsavq_core.formats.outliers import select_outliers

    gen = torch.Generator().manual_seed(seed)
    saliency = torch.randint(0, 4, (24, 40), generator=gen).float()
    saliency[3, 5] = float("nan")
    saliency[7, 9] = math.inf
    flat = saliency.reshape(-1).double()  # a sort puts NaN last, so negated it ranks least salient
    for count in (1, 7, 100, 959, 960):
        want = torch.sort(-flat, stable=True).indices[:count].sort().values
        assert torch.equal(select_outliers(saliency, count), want)
    assert 3 * 40 + 5 not in select_outliers(saliency, 959).tolist()
    assert select_outliers(saliency, 1).tolist() == [7 * 40 + 9]
