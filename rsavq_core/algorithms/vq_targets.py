"""What a layer's codebooks are fitted to (spec §5-§6): the prepared targets of one VQ layer.

WCSG's column order and bits, the EDSG target W − λñ, the metric ω, per-row scales and the
outlier positions, all in the codebooks' layout (columns permuted, rows padded to whole vectors).
Both the per-layer codebooks (``algorithms.vq``) and the codebooks shared across the blocks of one
layer type (``algorithms.shared_codebooks``) start from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.packing import WORD_BITS, packed_words
from rsavq_core.algorithms.allocation import Allocation, allocate
from rsavq_core.algorithms.sensitivity import (
    DampedFisher,
    channel_sensitivity,
    damp,
    fisher_diag_metric,
    natural_gradient,
)
from rsavq_core.algorithms.vq_options import VQOptions
from rsavq_core.calibration.statistics import LayerStats
from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.errors import CalibrationError, UnsupportedShapeError
from rsavq_core.formats.outliers import OUTLIER_ENTRY_BITS, outlier_count, positions_mask, select_outliers
from rsavq_core.formats.vq_layer import perm_dtype_bits

FP16_SMALLEST_NORMAL, FP16_MAX = 2.0**-14, 65504.0


@dataclass
class LayerTargets:
    """One layer, ready for its codebooks. Permuted / padded tensors are [M_pad, N] float32."""

    weight: torch.Tensor  # [M, N] float32, the layer's weight W
    alloc: Allocation  # column order and per-group bits (WCSG)
    shift: torch.Tensor | None  # [M, N] float32 EDSG shift λñ (None: no shift)
    omega: torch.Tensor | None  # [M, N] float32 metric ω in the weight's units (None: Euclidean)
    sensitivity: torch.Tensor | None  # [N] float32 channel sensitivities I_c (None: uniform bits)
    row_scale: torch.Tensor | None  # [M] float32 row scales as stored (fp16-exact), or None
    scaled_target: torch.Tensor  # [M, N] float32 (W − λñ) / s, original column order
    target: torch.Tensor  # [M_pad, N] the scaled target, permuted and padded (outliers zeroed)
    weight_scaled: torch.Tensor  # [M_pad, N] W / s, permuted and padded (outliers zeroed)
    metric: torch.Tensor | None  # [M_pad, N] ω·s², zero on padding and outliers (None: Euclidean, no padding)
    outlier_index: torch.Tensor  # [K] int64 flat positions kept exact (may be empty)
    exact: torch.Tensor | None  # [M_pad, N] bool: the outliers' positions, permuted (None: none)


def prepare_layer(weight: torch.Tensor, stats: LayerStats | None, cfg: QuantConfig) -> LayerTargets:
    """The targets of one layer under ``cfg``.

    Args:
        weight: [M, N] floating, the layer's weight (rows = output channels).
        stats: the layer's calibration statistics (None when the config needs none).
        cfg: the run's QuantConfig (method rsavq or kmeans).
    """
    if weight.dim() != 2:
        raise UnsupportedShapeError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    m, n = w.shape
    o = cfg.options_as(VQOptions)
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
    alloc = allocate(
        sens,
        n,
        cfg.bits,
        o.channel_groups,
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
    pad = -(-m // o.vector_length) * o.vector_length - m

    def prep(x: torch.Tensor) -> torch.Tensor:
        """Permute columns and pad rows with zeros: [M, N] -> [M_pad, N]."""
        x = x[:, alloc.perm]
        return torch.cat([x, x.new_zeros((pad, n))]) if pad else x

    t_p, w_p = prep(scaled_target), prep(w if row_scale is None else w / row_scale[:, None])
    om_p = prep(scaled_omega) if scaled_omega is not None else None
    outlier_index = select_outliers(_saliency(w, stats, omega), outlier_count(o.outlier_share, m, n))
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
    return LayerTargets(
        weight=w,
        alloc=alloc,
        shift=shift,
        omega=omega,
        sensitivity=sens,
        row_scale=row_scale,
        scaled_target=scaled_target,
        target=t_p,
        weight_scaled=w_p,
        metric=om_p,
        outlier_index=outlier_index,
        exact=exact,
    )


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


def _edsg_shift(w: torch.Tensor, nat: torch.Tensor | None, o: VQOptions) -> torch.Tensor | None:
    """λñ, or λ‖W‖·ñ/‖ñ‖ under lam_scale="relative" (spec §6.5). w, nat: [M, N] float32."""
    if nat is None:
        return None
    if o.lam_scale == "raw":
        return o.lam * nat
    return o.lam * float(w.norm()) / float(nat.norm().clamp_min(1e-30)) * nat


def effective_budget(m: int, n: int, cfg: QuantConfig) -> tuple[Callable[[int, int], float], float]:
    """(cost of a group of ``cols`` columns at b bits, bit budget of the layer) in stored bits.

    Counts what ``bitcount.layer_bits`` counts: the packed index stream (padded rows and word
    padding included) and the fp16 codebooks per group, and the permutation once per layer (none
    under uniform bits, whose column order is the identity; a WCSG order that happens to be the
    identity is charged here but not stored: the layer then comes in under its budget).
    """
    o = cfg.options_as(VQOptions)
    n_vec, d = -(-m // o.vector_length), o.sub_dim

    def cost(cols: int, bits: int) -> float:
        stream = packed_words(cols * n_vec * o.sub_vectors, bits * d) * WORD_BITS
        return float(stream + o.sub_vectors * 2 ** (bits * d) * d * 16)

    side = (16 * m if o.row_scales else 0) + outlier_count(o.outlier_share, m, n) * OUTLIER_ENTRY_BITS
    perm = 0 if o.allocation == "uniform" else n * perm_dtype_bits(n)  # uniform bits keep the column order
    return cost, cfg.bits * m * n - perm - side
