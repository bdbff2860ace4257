"""Sparse fp16 corrections for the few weights a codebook cannot serve (SpQR's outliers, simplified).

A layer with outliers stores, besides its codes, K positions and one fp16 value each; the dense
weight is the codebook part plus the values at those positions. Stored as residuals (weight minus
the codebook part), they need no decoding of the codes to apply, so the GEMV adds them as a sparse
product. Stored tensors of a layer ``<name>``: ``<name>.outlier_index`` int32 [K], flat row-major
positions m * N + n, strictly increasing (so M * N < 2**31); ``<name>.outlier_value`` fp16 [K].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rsavq_core.errors import ConfigError

# Every stored bit counts in the all-in bpw: a 32-bit position and a 16-bit value per outlier.
OUTLIER_ENTRY_BITS = 48
MAX_FLAT_INDEX = 2**31 - 1


@dataclass
class Outliers:
    index: torch.Tensor  # [K] int64 flat positions m * N + n, strictly increasing
    value: torch.Tensor  # [K] float16 residuals: the weight minus the codebook part there

    @property
    def count(self) -> int:
        return int(self.index.numel())

    def add_to(self, dense: torch.Tensor, value: torch.Tensor | None = None) -> torch.Tensor:
        """dense [M, N] + the residuals at their positions (out of place; differentiable in both).
        ``value`` [K] replaces the stored residuals (fine-tuning's trainable copy)."""
        v = (self.value if value is None else value).to(dense.dtype)
        flat = dense.reshape(-1).index_add(0, self.index.to(dense.device), v.to(dense.device))
        return flat.view_as(dense)


def outlier_count(share: float, out_features: int, in_features: int) -> int:
    """How many of a layer's weights a share of ``share`` keeps as outliers (rounded down)."""
    return int(share * out_features * in_features)


def select_outliers(saliency: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` most salient positions of ``saliency`` [M, N] (float): [count] int64 flat
    indices, increasing. Ties go to the lower position, so the choice is reproducible."""
    m, n = saliency.shape
    if m * n > MAX_FLAT_INDEX:
        raise ConfigError(f"a {m} x {n} layer is too large for int32 outlier positions")
    if count <= 0:
        return torch.zeros(0, dtype=torch.int64)
    flat = saliency.reshape(-1).double()
    # NaN (from NaN weights) is the least salient, as a sort of the negated values would have it
    flat = flat.masked_fill(flat.isnan(), -math.inf)
    count = min(count, flat.numel())
    # Everything above the count-th largest value, then the lowest positions of those equal to it:
    # a sort's tie rule (equal saliencies keep their order of position) at the cost of a top-k.
    threshold = torch.topk(flat, count, sorted=True).values[-1]
    above = (flat > threshold).nonzero().squeeze(1)
    tied = (flat == threshold).nonzero().squeeze(1)[: count - above.numel()]
    return torch.cat([above, tied]).sort().values


def positions_mask(index: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """[M, N] bool, True at the flat positions ``index`` [K] int64."""
    mask = torch.zeros(out_features * in_features, dtype=torch.bool)
    mask[index] = True
    return mask.view(out_features, in_features)
