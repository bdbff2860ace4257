"""The paper's plain k-means baseline: the RSAVQ engine with λ = 0, uniform bits, Euclidean metric."""

from __future__ import annotations

from dataclasses import dataclass

from rsavq_core.algorithms.vq_options import Allocation, Metric, Refit, VQOptions
from rsavq_core.config.knobs import knob
from rsavq_core.methods.registry import register_method
from rsavq_core.methods.rsavq import RSAVQ


@dataclass(frozen=True)
class KMeansOptions(VQOptions):
    """The VQ engine's options with the baseline's defaults; each can still be set explicitly."""

    lam: float = knob(0.0, "EDSG projection strength λ (0: no shift, the baseline)", ge=0.0, le=10.0)
    allocation: Allocation = knob("uniform", "WCSG bit rule (uniform: no WCSG, the baseline)")
    metric: Metric = knob("euclidean", "codebook metric (Euclidean: plain k-means, the baseline)")
    compensate: bool = knob(False, "VPTQ-style column-wise error compensation (off: the baseline)")
    refit: Refit = knob("mean", "final codebooks: the Lloyd mean (the baseline) or least squares on the output error")
    row_scales: bool = knob(False, "one fp16 scale per output row (off: the baseline)")
    outliers: float | None = knob(
        0.0, "share of each layer's weights kept exact as fp16 (none: the baseline)", ge=0.0, le=0.05
    )
    share_codebooks: bool | None = knob(
        False, "one set of codebooks per layer type (off: the baseline's per-layer codebooks)"
    )


@register_method
class KMeans(RSAVQ):
    name = "kmeans"
    summary = "k-means vector quantization: the paper's baseline, in the same engine as RSAVQ"
    options_type = KMeansOptions
    block_finetune_steps = 0  # the baseline
