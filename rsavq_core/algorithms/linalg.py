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
    matrix: torch.Tensor | Callable[[], torch.Tensor],  # [N, N] symmetric, float64 recommended
    damping: float,
    *,
    what: str,
    scale: float | None = None,
    finish: Callable[[torch.Tensor], T | None] | None = None,
) -> tuple[T | torch.Tensor, torch.Tensor, float]:
    """Cholesky of ``matrix + d * scale * I`` with the smallest d = damping * 10^k (k <= DAMPING_RETRIES) that works.

    ``matrix`` may instead be a function returning a fresh copy for each attempt: that copy is
    factored in place (one [N, N] buffer, where a copy plus its factor would be two), and
    ``scale`` must then be given. ``scale`` defaults to mean(diag(matrix)). ``finish(lower)``
    turns the lower factor into the result (it may overwrite it), or rejects it (None: numerically
    unusable) so that more damping is tried. Returns (result, diagonal of the damped matrix [N],
    d). ``what`` names the matrix in errors.
    """
    if callable(matrix):
        fresh = matrix
        if scale is None:
            raise ValueError("damped_cholesky: give scale with a matrix factory")
    else:
        fixed = matrix

        def fresh() -> torch.Tensor:
            return fixed + 0.0  # a copy (-0.0 becomes 0.0): the caller's matrix stays for the next attempt

        scale = float(matrix.diagonal().mean()) if scale is None else scale
    if not math.isfinite(scale) or scale <= 0:
        raise CalibrationError(f"{what} is degenerate (mean diagonal {scale:g})")
    frac = damping
    for attempt in range(DAMPING_RETRIES + 1):
        frac = damping * 10**attempt
        damped = fresh()
        if attempt == 0 and not all_finite(damped):
            raise CalibrationError(f"{what} is degenerate (it has non-finite entries)")
        # matrix + c·I without the [N, N] identity: two fewer N² buffers (3.3 GB at N = 14336 in float64)
        damped.diagonal().add_(frac * scale)
        diagonal = damped.diagonal().clone()
        lower, info = torch.linalg.cholesky_ex(damped, out=(damped, torch.empty((), dtype=torch.int32)))
        del damped  # lower is the same buffer, factored in place
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


def dead_columns(hessian: torch.Tensor, what: str) -> torch.Tensor:
    """[N] bool: the columns whose input is always zero (zero diagonal of ``hessian`` [N, N] XᵀX).

    Such a column does not affect the output; the caller quantizes it to 0.
    """
    diag = torch.diagonal(hessian)
    if bool((diag < 0).any()):
        raise CalibrationError(f"{what}: the Hessian has negative diagonal entries, so it is not an accumulated X^T X")
    dead = diag == 0
    if bool(dead.all()):
        raise CalibrationError(f"{what}: the Hessian is zero (no calibration tokens reached this layer)")
    return dead


def inverse_hessian_factor(
    hessian: torch.Tensor,  # [N, N] float32/float64 XᵀX, not modified
    damping: float,
    *,
    what: str,
    order: torch.Tensor | None = None,  # [N] int64: the column order (act-order), None: as stored
) -> tuple[torch.Tensor, float]:
    """(U [N, N] float64 upper with (H + d mean(diag H) I)⁻¹ = Uᵀ U, the damping d used).

    H is ``hessian`` in ``order``, in float64 (H of long calibration runs is ill-conditioned), with
    the diagonal of dead columns (``dead_columns``) set to 1. The reference forms H⁻¹ and factors
    it again (cholesky_inverse alone took 10 s at N = 1536 on 2 CPU cores). Instead factor
    H = V Vᵀ with V upper (a Cholesky of the index-reversed H), then U = V⁻¹: one triangular solve
    (0.5 s). Both in place: two float64 [N, N] buffers at the peak besides ``hessian`` (3.3 GB at
    N = 14336, a Llama-3-8B down projection), where copies of each step made six.
    """

    def reversed_copy() -> torch.Tensor:
        h = hessian.detach() if order is None else hessian.detach()[order][:, order]
        work = h.to(torch.float64, copy=True)
        del h
        diag = work.diagonal()
        diag[diag == 0] = 1.0
        reverse_in_place(work)
        return work

    def invert(lower_of_reversed: torch.Tensor) -> torch.Tensor | None:
        reverse_in_place(lower_of_reversed)  # now V, upper
        upper = torch.zeros_like(lower_of_reversed)  # made here: not alive during the Cholesky
        upper.diagonal().fill_(1.0)
        torch.linalg.solve_triangular(lower_of_reversed, upper, upper=True, out=upper)
        return upper if all_finite(upper) else None

    diag = torch.diagonal(hessian).to(torch.float64)
    mean_diag = float(torch.where(diag == 0, 1.0, diag).mean())
    upper, _, used = damped_cholesky(reversed_copy, damping, what=what, scale=mean_diag, finish=invert)
    return upper, used


def all_finite(matrix: torch.Tensor, rows: int = 256) -> bool:
    """torch.isfinite(matrix).all() for a 2-D matrix, ``rows`` rows at a time: isfinite's temporaries
    on a whole [N, N] float64 matrix are 1.3x its size (a 14336-wide one: 2.1 GB)."""
    return all(bool(torch.isfinite(matrix[i : i + rows]).all()) for i in range(0, matrix.shape[0], rows))


def reverse_in_place(matrix: torch.Tensor, chunk: int = 1 << 20) -> None:
    """matrix.flip(0, 1) without a second [N, N] buffer: for a contiguous matrix, reversing both
    axes is reversing its storage, done here ``chunk`` elements from each end at a time."""
    flat = matrix.view(-1)
    n = flat.numel()
    for i in range(0, n // 2, chunk):
        j = min(i + chunk, n // 2)
        head = flat[i:j].clone()
        flat[i:j] = flat[n - j : n - i].flip(0)
        flat[n - j : n - i] = head.flip(0)


def hessian_relative_error(
    weight: torch.Tensor,  # [M, N] original weights
    dequantized: torch.Tensor,  # [M, N] quantized weights
    hessian: torch.Tensor,  # [N, N] XᵀX (its scale does not matter)
    chunk: int = 1024,
) -> float:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ): the relative squared output error on the calibration inputs.

    A reported figure, not a step of any method: ΔW is formed in float64 (it is a small difference
    of large weights), the products with H in float32 (4·M·N² flops: in float64 they took as long
    as the layer's GPTQ) and summed in float64, H ``chunk`` columns at a time.
    """
    w = weight.detach().float()
    d = (w.double() - dequantized.detach().double()).float()
    num = den = 0.0
    for start in range(0, hessian.shape[1], chunk):
        cols = slice(start, start + chunk)
        h = hessian[:, cols].detach().float()
        num += float(((d @ h).double() * d[:, cols]).sum())
        den += float(((w @ h).double() * w[:, cols]).sum())
    if den <= 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den
