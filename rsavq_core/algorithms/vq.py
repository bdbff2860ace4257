"""RSAVQ for one linear layer: WCSG grouping + EDSG codebooks (+ optional compensation), spec §5-§7.

The same function runs the paper's ablation rows; only the config differs:
k-means (λ=0, uniform, Euclidean) → +EDSG (λ>0, Fisher metric) → +WCSG (sensitivity-sorted groups,
mixed bits) → + compensation (VPTQ column loop).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kernels.packing import WORD_BITS, packed_words
from rsavq_core.algorithms.allocation import Allocation, allocate
from rsavq_core.algorithms.codebook_update import least_squares_codebooks
from rsavq_core.algorithms.compensation import compensate_columns
from rsavq_core.algorithms.kmeans import assign, weighted_kmeans
from rsavq_core.algorithms.linalg import hessian_relative_error
from rsavq_core.algorithms.sensitivity import (
    DampedFisher,
    channel_sensitivity,
    damp,
    fisher_diag_metric,
    natural_gradient,
)
from rsavq_core.calibration.statistics import LayerStats, sink_protected_hessian
from rsavq_core.config import QuantConfig
from rsavq_core.errors import CalibrationError, UnsupportedShapeError
from rsavq_core.formats.outliers import (
    OUTLIER_ENTRY_BITS,
    Outliers,
    outlier_count,
    positions_mask,
    select_outliers,
)
from rsavq_core.formats.vq_layer import VQGroup, VQLayer, perm_dtype_bits, to_subvectors
from rsavq_core.methods.rsavq import VQOptions

FP16_SMALLEST_NORMAL, FP16_MAX = 2.0**-14, 65504.0


@dataclass
class LayerReport:
    """What the job shows per layer: bits, errors, timings."""

    bits: list[int]
    proxy_error: float  # Σ ω (Ŵ − W)² / Σ ω W² under the run's metric
    hessian_error: float | None  # tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) when H is known
    step_ratio: float  # ‖shift‖_F / ‖W‖_F of the EDSG target W − shift (spec §6.5)
    sensitivity: dict[str, float] = field(default_factory=dict)  # min / median / max of I_c
    seconds: float = 0.0
    refit: dict[str, float] | None = None  # output-error refit: relative error before / after

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _metric(
    o: VQOptions, weight: torch.Tensor, stats: LayerStats | None, fisher: DampedFisher | None
) -> torch.Tensor | None:
    """Elementwise metric ω [M, N] float32 (None = Euclidean)."""
    if o.metric == "euclidean":
        return None
    if o.metric == "fisher_diag":
        if fisher is None:
            raise CalibrationError("metric 'fisher_diag' needs the gradient statistics")
        return fisher_diag_metric(fisher)
    if stats is None or stats.hessian is None:
        raise CalibrationError("metric 'hessian' needs activation statistics")
    diag = stats.hessian.diagonal().float()
    return (diag / diag.mean().clamp_min(1e-30)).expand_as(weight).contiguous()


def quantize_vq(
    weight: torch.Tensor, stats: LayerStats | None, cfg: QuantConfig, bias: torch.Tensor | None = None
) -> tuple[VQLayer, LayerReport]:
    """Quantize one layer.

    Args:
        weight: [M, N] float32, the layer's weight (rows = output channels).
        stats: calibration statistics of this layer (None when the config needs none).
        cfg: the run's QuantConfig (method rsavq or kmeans).
        bias: [M] or None, copied to the result.
    """
    started = time.perf_counter()
    if weight.dim() != 2:
        raise UnsupportedShapeError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    m, n = w.shape
    o = cfg.options_as(VQOptions)
    gen = torch.Generator().manual_seed(cfg.seed)
    fisher = nat = sens = None
    if cfg.needs_gradients():
        if stats is None:
            raise CalibrationError("this configuration needs gradient statistics")
        fisher = damp(stats, o.damping)
        if o.lam > 0:
            nat = natural_gradient(stats, fisher)
        if o.allocation != "uniform":
            sens = channel_sensitivity(stats, fisher, o.sensitivity)
    lo, hi = o.group_bit_range(cfg.bits)
    alloc: Allocation = allocate(
        sens,
        n,
        cfg.bits,
        o.n_groups,
        o.allocation,
        lo,
        hi,
        device=w.device,
        budget_cost=effective_budget(m, n, cfg) if o.budget == "effective" else None,
    )
    # EDSG target W' = W − λñ: perturbation convention (spec §6.1) so the error follows −ñ.
    shift = _edsg_shift(w, nat, o)
    target = w - shift if shift is not None else w
    omega = _metric(o, w, stats, fisher)
    # With row scales the codebooks see W' / s; an error e in those units is s·e in the weight, so
    # every error measure (metric, output-error refit) weighs row m by s_m².
    row_scale = _row_scales(target) if o.row_scales else None
    scaled_target, scaled_omega = target, omega
    if row_scale is not None:
        scaled_target = target / row_scale[:, None]
        scaled_omega = (torch.ones_like(w) if omega is None else omega) * row_scale[:, None] ** 2

    v, n_pq, d = o.vector_len, o.sub_vectors, o.sub_dim
    n_vec = -(-m // v)
    pad = n_vec * v - m

    def prep(x: torch.Tensor) -> torch.Tensor:
        """Permute columns and pad rows with zeros: [M, N] -> [M_pad, N]."""
        x = x[:, alloc.perm]
        return torch.cat([x, x.new_zeros((pad, n))]) if pad else x

    t_p, w_p = prep(scaled_target), prep(w if row_scale is None else w / row_scale[:, None])
    om_p = prep(scaled_omega) if scaled_omega is not None else None
    outlier_index = select_outliers(_saliency(w, stats, omega), outlier_count(o.outliers, m, n))
    exact = prep(positions_mask(outlier_index, m, n).float()).bool() if outlier_index.numel() else None
    if om_p is None and (pad or exact is not None):
        # Padded rows must not pull centroids: give them zero weight even in the Euclidean metric.
        om_p = torch.ones_like(t_p)
        om_p[m:] = 0.0
    if exact is not None:
        assert om_p is not None
        om_p[exact] = 0.0  # outliers are stored exactly: the codebooks need not serve them,
        # and zeroed so that their size does not steer the unweighted k-means++ seeding either
        t_p, w_p = t_p.masked_fill(exact, 0.0), w_p.masked_fill(exact, 0.0)
    groups: list[VQGroup] = []
    for (start, stop), bits in zip(alloc.bounds, alloc.bits, strict=True):
        k = 2 ** (bits * d)
        sub_t = to_subvectors(t_p[:, start:stop], v, n_pq)
        sub_w = to_subvectors(w_p[:, start:stop], v, n_pq)
        sub_o = to_subvectors(om_p[:, start:stop], v, n_pq) if om_p is not None else None
        books, codes = [], []
        for p in range(n_pq):
            pts = sub_t[:, :, p].reshape(-1, d)
            wts = sub_o[:, :, p].reshape(-1, d) if sub_o is not None else None
            literal = o.assign == "paper"
            cents = weighted_kmeans(
                pts,
                wts,
                k,
                o.kmeans_iters,
                gen,
                fit_points=o.kmeans_fit_points,
                assign_points=sub_w[:, :, p].reshape(-1, d) if literal else None,
            )
            cents = cents.half().float()  # what is stored: assign against the fp16 codebook
            idx, _ = assign(sub_w[:, :, p].reshape(-1, d) if literal else pts, None if literal else wts, cents)
            books.append(cents)
            codes.append(idx.view(stop - start, n_vec))
        groups.append(
            VQGroup(
                bits=bits,
                start=start,
                stop=stop,
                codebooks=torch.stack(books).half(),
                indices=torch.stack(codes, dim=2),
            )
        )
    layer = VQLayer(
        out_features=m,
        in_features=n,
        vector_len=v,
        n_pq=n_pq,
        perm=alloc.perm.clone(),
        groups=groups,
        bias=None if bias is None else bias.detach().half(),
    )
    refit = None
    wanted = w  # what the outliers are stored as: the weights, or the column loop's updated values
    if o.compensate or o.refit == "output":
        if stats is None or stats.hessian is None:
            raise CalibrationError("compensation and the output-error refit need the activation Hessian")
        hessian = sink_protected_hessian(stats, o.sink_share)
        if o.compensate:  # the column loop's feedback is row by row: the same in scaled units
            seen = compensate_columns(layer, scaled_target, hessian, om_p, o.hessian_damping, exact=exact)
            wanted = seen[:m][:, torch.argsort(alloc.perm)]
            wanted = wanted if row_scale is None else wanted * row_scale[:, None]
        if o.refit == "output":
            refit = least_squares_codebooks(
                layer, scaled_target, hessian, damping=o.hessian_damping, row_weights=row_scale, exact=exact
            )
    if row_scale is not None:
        layer.row_scale = row_scale.half()
    if outlier_index.numel():
        codebook_part = layer.dequantize().reshape(-1)[outlier_index]
        layer.outliers = Outliers(outlier_index, (wanted.reshape(-1)[outlier_index] - codebook_part).half())
    report = _report(layer, w, shift, omega, stats, sens, started)
    report.refit = refit
    return layer, report


def _saliency(w: torch.Tensor, stats: LayerStats | None, omega: torch.Tensor | None) -> torch.Tensor:
    """[M, N] float32: how much each weight's exactness is worth. w² times the input channel's
    Hessian diagonal (its share of the output error) when H is known, else times the run's metric."""
    if stats is not None and stats.hessian is not None:
        return w.pow(2) * stats.hessian.diagonal().float().clamp_min(0)[None, :]
    return w.pow(2) if omega is None else w.pow(2) * omega


def _row_scales(target: torch.Tensor) -> torch.Tensor:
    """[M, N] float32 -> [M] float32: each row's RMS over the rows' mean RMS, as stored (fp16).

    Relative scales (mean 1) leave W / s at the weights' own magnitude, so fine-tuning's learning
    rate means for the codebooks what it means without scales, and moves the scales by a share of
    themselves. Kept within fp16's normal range, so never zero (an all-zero row then has codes
    that quantize zeros)."""
    rms = target.pow(2).mean(1).sqrt()
    mean = float(rms.mean())
    relative = rms / mean if mean > 0 else torch.ones_like(rms)
    return relative.clamp(FP16_SMALLEST_NORMAL, FP16_MAX).half().float()


def effective_budget(m: int, n: int, cfg: QuantConfig) -> tuple[Callable[[int, int], float], float]:
    """(cost of a group of ``cols`` columns at b bits, bit budget of the layer) in stored bits.

    Counts what ``bitcount.layer_bits`` counts: the packed index stream (padded rows and word
    padding included) and the fp16 codebooks per group, and the permutation once per layer.
    """
    o = cfg.options_as(VQOptions)
    n_vec, d = -(-m // o.vector_len), o.sub_dim

    def cost(cols: int, bits: int) -> float:
        stream = packed_words(cols * n_vec * o.sub_vectors, bits * d) * WORD_BITS
        return stream + o.sub_vectors * 2 ** (bits * d) * d * 16

    side = (16 * m if o.row_scales else 0) + outlier_count(o.outliers, m, n) * OUTLIER_ENTRY_BITS
    return cost, cfg.bits * m * n - n * perm_dtype_bits(n) - side


def _edsg_shift(w: torch.Tensor, nat: torch.Tensor | None, o: VQOptions) -> torch.Tensor | None:
    """λñ, or λ‖W‖·ñ/‖ñ‖ under lam_scale="relative" (spec §6.5). w, nat: [M, N] float32."""
    if nat is None:
        return None
    if o.lam_scale == "raw":
        return o.lam * nat
    return o.lam * float(w.norm()) / float(nat.norm().clamp_min(1e-30)) * nat


def _report(
    layer: VQLayer,
    w: torch.Tensor,
    shift: torch.Tensor | None,
    omega: torch.Tensor | None,
    stats: LayerStats | None,
    sens: torch.Tensor | None,
    started: float,
) -> LayerReport:
    dequantized = layer.dequantize()
    delta = dequantized - w
    om = omega if omega is not None else torch.ones_like(w)
    proxy = float((om * delta**2).sum() / (om * w**2).sum().clamp_min(1e-30))
    herr = None
    if stats is not None and stats.hessian is not None:
        herr = hessian_relative_error(w, dequantized, stats.hessian)
    step = float(shift.norm() / w.norm().clamp_min(1e-30)) if shift is not None else 0.0
    summary = {}
    if sens is not None:
        summary = {"min": float(sens.min()), "median": float(sens.median()), "max": float(sens.max())}
    return LayerReport(
        bits=[g.bits for g in layer.groups],
        proxy_error=proxy,
        hessian_error=herr,
        step_ratio=step,
        sensitivity=summary,
        seconds=time.perf_counter() - started,
    )
