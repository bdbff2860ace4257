"""Natural gradient (spec §4) and channel sensitivity I_c (spec §5.1) from Kronecker Fisher factors.

With F ≈ (F_I ⊗ F_O) / τ (spec §3.3) and Tikhonov damping F̃ = F + α·(tr F / dim)·I [I]:

    ñ   = τ · F̃_O⁻¹ Ḡ F̃_I⁻¹                                   [M, N]
    I_c = ½ gᵀ F_c⁻¹ g = ½ · τ / (F̃_I)_cc · g_cᵀ F̃_O⁻¹ g_c       ("inverse", paper Alg. 1 / A.7)
    I_c = ½ gᵀ F_c g   = ½ · (F_I)_cc / τ · g_cᵀ F_O g_c         ("direct", third-party summaries)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rsavq_core.algorithms.linalg import damped_cholesky
from rsavq_core.calibration.statistics import LayerStats
from rsavq_core.errors import CalibrationError


@dataclass
class DampedFisher:
    chol_out: torch.Tensor  # [M, M] float64, lower Cholesky factor of F̃_O
    chol_in: torch.Tensor  # [N, N] float64, lower Cholesky factor of F̃_I
    diag_out: torch.Tensor  # [M] float64, diag of F̃_O
    diag_in: torch.Tensor  # [N] float64, diag of F̃_I
    tau: float


def gradient_statistics(stats: LayerStats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Ḡ [M, N], F_O [M, M], F_I [N, N]) float32, or ``CalibrationError`` when the store has none."""
    if stats.fisher_out is None or stats.fisher_in is None or stats.grad_mean is None:
        raise CalibrationError("these statistics hold no gradients/Fisher factors (Hessian-only cache?)")
    return stats.grad_mean, stats.fisher_out, stats.fisher_in


def damp(stats: LayerStats, alpha: float) -> DampedFisher:
    """Damped factors of one layer; needs the gradient statistics."""
    _, fisher_out, fisher_in = gradient_statistics(stats)
    lo, do, _ = damped_cholesky(fisher_out.double(), alpha, what="output-channel Fisher factor")
    li, di, _ = damped_cholesky(fisher_in.double(), alpha, what="input-channel Fisher factor")
    return DampedFisher(lo, li, do, di, stats.tau)


def natural_gradient(stats: LayerStats, fisher: DampedFisher) -> torch.Tensor:
    """ñ = τ F̃_O⁻¹ Ḡ F̃_I⁻¹, [M, N] float32 (two Cholesky solves, in float64 for stability)."""
    g = gradient_statistics(stats)[0].double()
    left = torch.cholesky_solve(g, fisher.chol_out)  # F̃_O⁻¹ Ḡ
    both = torch.cholesky_solve(left.T.contiguous(), fisher.chol_in).T  # (F̃_O⁻¹ Ḡ) F̃_I⁻¹ (F̃_I symmetric)
    return (fisher.tau * both).float()


def channel_sensitivity(stats: LayerStats, fisher: DampedFisher, form: str = "inverse") -> torch.Tensor:
    """I_c for every input channel c, [N] float32, before the +1 shift of spec §5.2."""
    grad, fisher_out, fisher_in = gradient_statistics(stats)
    g = grad.double()
    if form == "inverse":
        quad = (g * torch.cholesky_solve(g, fisher.chol_out)).sum(0)  # g_cᵀ F̃_O⁻¹ g_c
        sens = 0.5 * fisher.tau * quad / fisher.diag_in
    elif form == "direct":
        quad = (g * (fisher_out.double() @ g)).sum(0)
        sens = 0.5 * fisher_in.double().diagonal() * quad / max(fisher.tau, 1e-30)
    else:
        raise CalibrationError(f"unknown sensitivity form {form!r}")
    return sens.clamp_min(0).float()


def fisher_diag_metric(fisher: DampedFisher) -> torch.Tensor:
    """Elementwise weights ω[i, j] = (F̃_I)_jj (F̃_O)_ii / τ of the Fisher-diagonal metric, [M, N] float32.

    The overall scale is irrelevant to the codebook objective (spec §6.2), so it is normalised to
    mean 1 to keep float32 sums well conditioned.
    """
    omega = torch.outer(fisher.diag_out, fisher.diag_in)
    return (omega / omega.mean()).float()
