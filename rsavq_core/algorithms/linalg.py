"""The numerics several methods share: one damped Cholesky, the inverse-Hessian factor of GPTQ-style
error feedback, and the Hessian-weighted output error every report uses."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TypeVar

import torch

from rsavq_core.errors import CalibrationError

log = logging.getLogger(__name__)

DAMPING_RETRIES = 3  # extra attempts, each with 10x the previous damping
T = TypeVar("T")


def damped_cholesky(
    matrix: torch.Tensor,  # [N, N] symmetric, float64 recommended
    damping: float,
    *,
    what: str,
    scale: float | None = None,
    finish: Callable[[torch.Tensor], T | None] | None = None,
) -> tuple[T | torch.Tensor, torch.Tensor, float]:
    """Cholesky of ``matrix + d * scale * I`` with the smallest d = damping * 10^k (k <= DAMPING_RETRIES) that works.

    ``scale`` defaults to mean(diag(matrix)). ``finish(lower)`` turns the lower factor into the
    result, or rejects it (None: numerically unusable) so that more damping is tried.
    Returns (result, diagonal of the damped matrix [N], d). ``what`` names the matrix in errors.
    """
    scale = float(matrix.diagonal().mean()) if scale is None else scale
    if not bool(torch.isfinite(matrix).all()) or not math.isfinite(scale) or scale <= 0:
        raise CalibrationError(f"{what} is degenerate (mean diagonal {scale:g})")
    frac = damping
    for attempt in range(DAMPING_RETRIES + 1):
        frac = damping * 10**attempt
        # matrix + c·I without the [N, N] identity: off the diagonal x + 0.0 (what adding c·0 did,
        # -0.0 included), on it x + c. Two fewer N² buffers: 3.3 GB at N = 14336 in float64.
        damped = matrix + 0.0
        damped.diagonal().add_(frac * scale)
        lower, info = torch.linalg.cholesky_ex(damped)
        diagonal = damped.diagonal().clone()
        del damped  # not alive beside finish's buffers
        if int(info) == 0:
            result = finish(lower) if finish is not None else lower
            if result is not None:
                return result, diagonal, frac
        del lower
        if attempt < DAMPING_RETRIES:
            log.warning("%s is not positive definite with damping %g; retrying with %g", what, frac, frac * 10)
    raise CalibrationError(
        f"{what} is not positive definite even with damping {frac:g} x mean(diag); check the calibration statistics"
    )


def prepare_hessian(hessian: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(H as float64 with dead columns' diagonal set to 1 [N, N], dead-column mask [N] bool).

    A column whose input is always zero does not affect the output; the caller quantizes it to 0.
    """
    h = hessian.detach().to(torch.float64).clone()
    diag = torch.diagonal(h)
    if bool((diag < 0).any()):
        raise CalibrationError(f"{what}: the Hessian has negative diagonal entries, so it is not an accumulated X^T X")
    dead = diag == 0
    if bool(dead.all()):
        raise CalibrationError(f"{what}: the Hessian is zero (no calibration tokens reached this layer)")
    h[dead, dead] = 1.0
    return h, dead


def inverse_hessian_factor(h: torch.Tensor, damping: float, *, what: str) -> tuple[torch.Tensor, float]:
    """(U [N, N] float64 upper with (H + d mean(diag H) I)⁻¹ = Uᵀ U, the damping d used). h: [N, N] float64.

    The reference forms H⁻¹ and factors it again; cholesky_inverse alone took 10 s at N = 1536 on
    2 CPU cores. Instead factor H = V Vᵀ with V upper (a Cholesky of the index-reversed H); then
    H⁻¹ = Uᵀ U with U = V⁻¹, one triangular solve (0.5 s).
    """

    def invert(lower_of_flipped: torch.Tensor) -> torch.Tensor | None:
        eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)  # made here: not alive during the Cholesky
        upper = torch.linalg.solve_triangular(lower_of_flipped.flip(0, 1), eye, upper=True)
        del eye
        return upper if bool(torch.isfinite(upper).all()) else None

    mean_diag = float(torch.diagonal(h).mean())
    upper, _, used = damped_cholesky(h.flip(0, 1), damping, what=what, scale=mean_diag, finish=invert)
    return upper, used


def hessian_relative_error(
    weight: torch.Tensor,  # [M, N] original weights
    dequantized: torch.Tensor,  # [M, N] quantized weights
    hessian: torch.Tensor,  # [N, N] XᵀX (its scale does not matter)
) -> float:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) in float64: the relative squared output error on the calibration inputs."""
    w = weight.detach().to(torch.float64)
    d = w - dequantized.detach().to(torch.float64)
    h = hessian.detach().to(torch.float64)
    num = float(((d @ h) * d).sum())
    den = float(((w @ h) * w).sum())
    if den <= 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den
