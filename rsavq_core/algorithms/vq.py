"""RSAVQ for one linear layer: WCSG grouping + EDSG codebooks (+ optional compensation), spec §5-§7.

The same function runs the paper's ablation rows; only the config differs:
k-means (λ=0, uniform, Euclidean) → +EDSG (λ>0, Fisher metric) → +WCSG (sensitivity-sorted groups,
mixed bits) → + compensation (VPTQ column loop).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from rsavq_core.algorithms.codebook_update import least_squares_codebooks
from rsavq_core.algorithms.compensation import compensate_columns
from rsavq_core.algorithms.kmeans import assign, weighted_kmeans
from rsavq_core.algorithms.linalg import hessian_relative_error
from rsavq_core.algorithms.shared_codebooks import SharedCodebooks
from rsavq_core.algorithms.vq_options import VQOptions
from rsavq_core.algorithms.vq_targets import LayerTargets, prepare_layer
from rsavq_core.calibration.statistics import LayerStats, sink_protected_hessian
from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.errors import CalibrationError
from rsavq_core.formats.outliers import Outliers
from rsavq_core.formats.vq_layer import VQGroup, VQLayer, to_subvectors


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


def quantize_vq(
    weight: torch.Tensor,
    stats: LayerStats | None,
    cfg: QuantConfig,
    bias: torch.Tensor | None = None,
    shared: SharedCodebooks | None = None,
) -> tuple[VQLayer, LayerReport]:
    """Quantize one layer.

    Args:
        weight: [M, N] float32, the layer's weight (rows = output channels).
        stats: calibration statistics of this layer (None when the config needs none).
        cfg: the run's QuantConfig (method rsavq or kmeans).
        bias: [M] or None, copied to the result.
        shared: the codebooks this layer shares with the other blocks' layers of its type
            (``share_codebooks``); then only codes (and scales, outliers) are the layer's own.
    """
    started = time.perf_counter()
    o = cfg.options_as(VQOptions)
    gen = torch.Generator().manual_seed(cfg.seed)
    t = prepare_layer(weight, stats, cfg)
    w, m, n = t.weight, *t.weight.shape
    groups = [
        _group(t, o, gi, (start, stop), bits, gen, shared)
        for gi, ((start, stop), bits) in enumerate(zip(t.alloc.bounds, t.alloc.bits, strict=True))
    ]
    layer = VQLayer(
        out_features=m,
        in_features=n,
        vector_len=o.vector_length,
        n_pq=o.sub_vectors,
        perm=t.alloc.perm.clone(),
        groups=groups,
        bias=None if bias is None else bias.detach().half(),
    )
    wanted, refit = _feed_back_errors(layer, t, stats, o, shared)
    if t.row_scale is not None:
        layer.row_scale = t.row_scale.half()
    if t.outlier_index.numel():
        codebook_part = layer.dequantize().reshape(-1)[t.outlier_index]
        layer.outliers = Outliers(t.outlier_index, (wanted.reshape(-1)[t.outlier_index] - codebook_part).half())
    report = _report(layer, w, t.shift, t.omega, stats, t.sensitivity, started)
    report.refit = refit
    return layer, report


def _group(
    t: LayerTargets,
    o: VQOptions,
    gi: int,
    bounds: tuple[int, int],
    bits: int,
    gen: torch.Generator,
    shared: SharedCodebooks | None,
) -> VQGroup:
    """Channel group ``gi`` (columns ``bounds`` of the permuted target): its codebooks and codes."""
    start, stop = bounds
    v, n_pq, d = o.vector_length, o.sub_vectors, o.sub_dim
    n_vec = -(-t.weight.shape[0] // v)
    sub_t = to_subvectors(t.target[:, start:stop], v, n_pq)
    sub_w = to_subvectors(t.weight_scaled[:, start:stop], v, n_pq)
    sub_o = to_subvectors(t.metric[:, start:stop], v, n_pq) if t.metric is not None else None
    literal = o.assign == "paper"
    if shared is not None:
        book_set = shared.group(gi, bits, n_pq, d).float()
    else:
        book_set = torch.stack(
            [
                weighted_kmeans(
                    sub_t[:, :, p].reshape(-1, d),
                    sub_o[:, :, p].reshape(-1, d) if sub_o is not None else None,
                    2 ** (bits * d),
                    o.kmeans_iters,
                    gen,
                    fit_points=o.kmeans_fit_points,
                    assign_points=sub_w[:, :, p].reshape(-1, d) if literal else None,
                )
                for p in range(n_pq)
            ]
        )
        book_set = book_set.half().float()  # what is stored: assign against the fp16 codebook
    if o.compensate:
        # the column loop derives every code again, with error feedback: a search here would be
        # thrown away (it cost as much as the loop's own searches)
        indices = torch.zeros(stop - start, n_vec, n_pq, dtype=torch.long, device=t.target.device)
    else:
        codes = []
        for p in range(n_pq):
            pts = (sub_w if literal else sub_t)[:, :, p].reshape(-1, d)
            wts = None if literal or sub_o is None else sub_o[:, :, p].reshape(-1, d)
            idx, _ = assign(pts, wts, book_set[p])
            codes.append(idx.view(stop - start, n_vec))
        indices = torch.stack(codes, dim=2)
    key = None if shared is None else shared.key(gi)
    return VQGroup(bits=bits, start=start, stop=stop, codebooks=book_set.half(), indices=indices, shared=key)


def _feed_back_errors(
    layer: VQLayer, t: LayerTargets, stats: LayerStats | None, o: VQOptions, shared: SharedCodebooks | None
) -> tuple[torch.Tensor, dict[str, float] | None]:
    """Error feedback (the column loop) and the output-error codebook refit, each when asked for.

    Returns what the outliers are stored against ([M, N] float32: the weights, or the column
    loop's updated values) and the refit's report (None when it did not run).
    """
    w, m = t.weight, t.weight.shape[0]
    if not (o.compensate or o.refit == "output"):
        return w, None
    if stats is None or stats.hessian is None:
        raise CalibrationError("compensation and the output-error refit need the activation Hessian")
    hessian = sink_protected_hessian(stats, o.sink_share)
    wanted, refit = w, None
    if o.compensate:  # the column loop's feedback is row by row: the same in scaled units
        seen = compensate_columns(
            layer, t.scaled_target, hessian, t.metric, o.hessian_damping, exact=t.exact, refit=shared is None
        )
        wanted = seen[:m][:, torch.argsort(t.alloc.perm)]
        wanted = wanted if t.row_scale is None else wanted * t.row_scale[:, None]
    # Shared codebooks are the other layers' too: a per-layer refit would make them this layer's own.
    if o.refit == "output" and shared is None:
        refit = least_squares_codebooks(
            layer, t.scaled_target, hessian, damping=o.hessian_damping, row_weights=t.row_scale, exact=t.exact
        )
    return wanted, refit


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
