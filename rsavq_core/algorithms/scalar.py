"""Scalar baselines: grouped asymmetric integer quantization by round-to-nearest and by GPTQ.

Both return a ``ScalarLayer``: codes uint8 [M, N], and per (row, group of ``group_size`` input
channels) an fp16 scale and an integer zero point (in code units, stored as fp16), with
``dequant = (code - zero) * scale``. When ``group_size`` does not divide N the last group is
partial (N = 576, g = 128: four groups of 128 and one of 64).

The grid is the reference GPTQ ``Quantizer`` (sym=False): per group the range [min(w, 0),
max(w, 0)] is cut into 2**bits - 1 steps and the zero point is rounded to an integer. Two changes
make the stored fp16 layer reproduce exactly what was optimized:

* the scale is rounded *up* to the next fp16 value and the zero point and codes are computed
  against that rounded scale, so every weight in the range stays within scale/2 of the grid;
* integer zero points up to 255 are exact in fp16, so they need no care.

GPTQ follows Frantar et al. and their reference ``gptq.py``: dead columns, percent damping,
upper Cholesky factor of H^-1, lazy block updates. Group parameters are taken from the current,
error-updated weights when the loop reaches a group's first column (``static_groups=False``).
With ``act_order`` columns are processed by diag(H) descending; groups stay contiguous in the
*original* column order (the stored layout), so their parameters are fixed up front from the
original weights (the reference's ``static_groups=True``): a group's columns are then spread
over the whole permuted loop and no single point in it sees them all updated.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from rsavq_core.algorithms.column_loop import Block, quantize_columns
from rsavq_core.algorithms.linalg import dead_columns, hessian_relative_error, inverse_hessian_factor
from rsavq_core.errors import CalibrationError, ConfigError, UnsupportedShapeError
from rsavq_core.formats.scalar import ScalarLayer

MIN_BITS, MAX_BITS = 1, 8  # codes are stored as uint8


def rtn_quantize(
    weight: torch.Tensor,  # [M, N] floating point (computed in float32)
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,  # [M] floating point, stored as float16
) -> ScalarLayer:
    """Round-to-nearest with min-max (0 included) grid per (row, group of input channels)."""
    bits, group_size = _check_common(weight, bits, group_size, bias)
    w = weight.detach().to(torch.float32)
    maxq = 2**bits - 1
    scales, zeros = _group_grid(w, group_size, maxq)
    idx = _group_index(w.shape[1], group_size, w.device)
    codes = _encode(w, scales[:, idx], zeros[:, idx], maxq)
    return _layer(codes, scales, zeros, bits, group_size, bias)


def gptq_quantize(
    weight: torch.Tensor,  # [M, N] floating point (computed in float32)
    hessian: torch.Tensor,  # [N, N] X^T X over calibration tokens; its scale does not matter
    bits: int,
    group_size: int,
    *,
    block_size: int = 128,
    damping: float = 0.01,
    act_order: bool = False,
    bias: torch.Tensor | None = None,  # [M] floating point, stored as float16
    report_hessian: torch.Tensor | None = None,  # [N, N]: the H of ``proxy_loss`` (default: ``hessian``)
) -> tuple[ScalarLayer, dict[str, float]]:
    """GPTQ with lazy block updates. Returns the layer and statistics.

    Stats: ``proxy_loss`` = tr(dW H dW^T) / tr(W H W^T) with the undamped H (relative output
    error on the calibration inputs; H is ``report_hessian`` when given), ``seconds``, ``damping``
    (the fraction of mean diag(H) finally used, larger than asked if the Cholesky needed retries),
    ``dead_columns``.
    """
    start = time.perf_counter()
    bits, group_size = _check_common(weight, bits, group_size, bias)
    _check_gptq(weight, hessian, block_size, damping)
    m, n = weight.shape
    what = f"GPTQ on a [{m} x {n}] layer"
    maxq = 2**bits - 1
    w = weight.detach().to(torch.float32).clone()
    dead = dead_columns(hessian, what)
    w[:, dead] = 0.0  # a dead column does not affect the output

    n_groups = -(-n // group_size)
    if act_order:
        diag = torch.diagonal(hessian).to(torch.float64).masked_fill(dead, 1.0)  # as the factor sees it
        perm = torch.argsort(diag, descending=True, stable=True)
        scales, zeros = _group_grid(w, group_size, maxq)  # static groups, original order
        w = w[:, perm]
        col_group = _group_index(n, group_size, w.device)[perm].tolist()
    else:
        perm = None
        scales = torch.empty(m, n_groups, dtype=torch.float32, device=w.device)
        zeros = torch.empty_like(scales)
        col_group = _group_index(n, group_size, w.device).tolist()

    upper64, used = inverse_hessian_factor(hessian, damping, what=what, order=perm)
    upper = upper64.to(torch.float32)
    del upper64  # one [N, N] float64 less during the column loop (1.6 GB at N = 14336)
    codes = torch.empty(m, n, dtype=torch.uint8, device=w.device)

    def quantize(col: int, values: torch.Tensor, block: Block) -> torch.Tensor:
        g = col_group[col]
        if perm is None and col % group_size == 0:
            # The group's grid from its columns as the error feedback has left them so far.
            cur = block.current(col, min(col + group_size, n))
            scales[:, g], zeros[:, g] = _grid(cur.amin(1), cur.amax(1), maxq)
        s, z = scales[:, g], zeros[:, g]
        q = _encode(values[:, None], s[:, None], z[:, None], maxq).squeeze(1)
        codes[:, col] = q
        return (q.to(torch.float32) - z) * s

    quantize_columns(w, upper, quantize, block_size)
    del upper, w
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    layer = _layer(codes, scales, zeros, bits, group_size, bias)
    stats = {
        "proxy_loss": hessian_relative_error(
            weight, layer.dequantize(), hessian if report_hessian is None else report_hessian
        ),
        "seconds": time.perf_counter() - start,
        "damping": used,
        "dead_columns": float(dead.sum()),
    }
    return layer, stats


def _group_grid(
    w: torch.Tensor,  # [M, N] float32
    group_size: int,
    maxq: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros [M, ceil(N / group_size)] float32 (fp16-exact) of every group."""
    m, n = w.shape
    n_groups = -(-n // group_size)
    # Zero padding leaves min(w, 0) and max(w, 0) of the partial last group unchanged.
    grouped = F.pad(w, (0, n_groups * group_size - n)).view(m, n_groups, group_size)
    return _grid(grouped.amin(-1), grouped.amax(-1), maxq)


def _grid(
    wmin: torch.Tensor,  # [...] float32 minimum of each group
    wmax: torch.Tensor,  # [...] float32 maximum of each group
    maxq: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16-exact, rounded up) and integer zero point, both float32 of the input's shape."""
    lo, hi = wmin.clamp(max=0.0), wmax.clamp(min=0.0)
    flat = lo == hi  # an all-zero group: any positive scale reproduces it; avoid 0 / 0
    lo = torch.where(flat, torch.full_like(lo, -1.0), lo)
    hi = torch.where(flat, torch.full_like(hi, 1.0), hi)
    scale = _fp16_ceil((hi - lo) / maxq)
    if not bool(torch.isfinite(scale).all()):
        raise ConfigError(
            f"weight range too large: a group's scale overflows float16 (range up to {float((hi - lo).max()):.3g})"
        )
    zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def _fp16_ceil(x: torch.Tensor) -> torch.Tensor:  # [...] float32, positive
    """The smallest float16 value >= x, as float32; rounding up keeps the range covered."""
    h = x.to(torch.float16)
    below = h.to(torch.float32) < x
    # For positive float16 the next value up is the next bit pattern (also from 0 and subnormals).
    up = (h.view(torch.int16) + 1).view(torch.float16)
    return torch.where(below, up, h).to(torch.float32)


def _encode(
    w: torch.Tensor,  # [M, K] float32
    scale: torch.Tensor,  # [M, K] float32, broadcastable
    zero: torch.Tensor,  # [M, K] float32, broadcastable
    maxq: int,
) -> torch.Tensor:
    """Codes [M, K] uint8: nearest grid point of each weight."""
    return (torch.round(w / scale) + zero).clamp(0, maxq).to(torch.uint8)


def _group_index(n: int, group_size: int, device: torch.device) -> torch.Tensor:
    """[N] int64: the group of every input channel."""
    return torch.arange(n, device=device) // group_size


def _layer(
    codes: torch.Tensor,  # [M, N] uint8
    scales: torch.Tensor,  # [M, G] float32, fp16-exact
    zeros: torch.Tensor,  # [M, G] float32, integer
    bits: int,
    group_size: int,
    bias: torch.Tensor | None,  # [M]
) -> ScalarLayer:
    m, n = codes.shape
    stored_bias = None if bias is None else bias.detach().to(torch.float16).clone()
    return ScalarLayer(
        out_features=m,
        in_features=n,
        bits=bits,
        group_size=group_size,
        codes=codes,
        scales=scales.to(torch.float16),
        zeros=zeros.to(torch.float16),
        bias=stored_bias,
    )


def _check_common(
    weight: torch.Tensor,  # [M, N]
    bits: int,
    group_size: int,
    bias: torch.Tensor | None,  # [M]
) -> tuple[int, int]:
    """Validate the arguments both quantizers share; returns (bits, group_size) as ints."""
    bits = _as_int("bits", bits)
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    group_size = _as_int("group_size", group_size)
    if group_size < 1:
        raise ConfigError(f"group_size must be a positive integer, got {group_size}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or min(weight.shape) < 1:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise UnsupportedShapeError(f"weight must be a non-empty 2-D tensor [out, in], got {shape}")
    if not weight.is_floating_point():
        raise ConfigError(f"weight must be floating point, got {weight.dtype}")
    if not bool(torch.isfinite(weight).all()):
        raise ConfigError(f"weight of shape {tuple(weight.shape)} contains NaN or Inf")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise UnsupportedShapeError(
            f"bias must have shape ({weight.shape[0]},) to match the weight "
            f"{tuple(weight.shape)}, got {tuple(bias.shape)}"
        )
    return bits, group_size


def _check_gptq(
    weight: torch.Tensor,  # [M, N]
    hessian: torch.Tensor,  # [N, N]
    block_size: int,
    damping: float,
) -> None:
    n = weight.shape[1]
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (n, n):
        shape = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise UnsupportedShapeError(
            f"hessian must have shape ({n}, {n}) to match the weight {tuple(weight.shape)}, got {shape}"
        )
    if not bool(torch.isfinite(hessian).all()):
        raise CalibrationError(f"hessian of shape {tuple(hessian.shape)} contains NaN or Inf")
    if _as_int("block_size", block_size) < 1:
        raise ConfigError(f"block_size must be a positive integer, got {block_size}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 < damping <= 10:
        raise ConfigError(f"damping must be a number in (0, 10], got {damping!r}")


def _as_int(name: str, value: object) -> int:
    """Accept ints and integral floats (QuantConfig.bits is a float); reject bools and the rest."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value != int(value)
    ):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    return int(value)
