"""RSAVQ: WCSG channel groups + EDSG codebooks (+ optional VPTQ compensation), spec §5-§7.

The options (``methods.vq_options``) are those of the vector-quantization engine
(``rsavq_core.algorithms.vq``); the k-means baseline (``methods.kmeans``) is the same engine with
other defaults. The spec's inferred ([I]) choices are made here, each with the section of
``shared/docs/rsavq_spec.md`` that discusses it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from rsavq_core.algorithms.vq_options import (
    AUTO_MAX_ENTRIES,
    DEFAULT_OUTLIERS,
    MAX_INDEX_BITS,
    PER_LAYER_GROUPS,
    PER_LAYER_VECTOR_LEN,
    SHARED_INDEX_BITS,
    VQOptions,
)
from rsavq_core.config.knobs import MethodOptions
from rsavq_core.errors import ConfigError
from rsavq_core.methods.registry import QuantMethod, SharedFit, StatsNeeds, register_method

if TYPE_CHECKING:
    import torch

    from rsavq_core.calibration.statistics import LayerStats
    from rsavq_core.config.quant_config import QuantConfig
    from rsavq_core.formats.base import QuantizedLayer


def shared_by_default(options: VQOptions, cfg: QuantConfig) -> bool:
    """Whether ``share_codebooks`` left to derive turns on: every condition shared codebooks need
    holds (one codebook size for every layer of a type), the bits are 1 to 4 (vectors of 12 / bits
    = 12, 6, 4 or 3 dimensions; from 5 bits 2^12 entries leave vectors of 2 or 1), and the user
    did not choose a per-layer layout of their own."""
    return (
        options.allocation == "uniform"
        and options.budget == "index"
        and cfg.calib_inputs != "quantized"
        and cfg.bits in (1, 2, 3, 4)
        and options.vector_len is None
        and options.n_pq is None
        and options.n_groups is None
    )


@register_method
class RSAVQ(QuantMethod):
    name = "rsavq"
    summary = (
        "RSAVQ: error-direction-shifted codebooks (EDSG) in the Fisher metric; sensitivity-grouped "
        "channels (WCSG) with --allocation proportional (off by default: it measured worse)"
    )
    options_type = VQOptions
    # 3 bits, SmolLM2-135M: perplexity 37.92 -> 32.09 for about 9 minutes on 2 CPU cores (README).
    block_finetune_steps = 64

    def resolve(self, options: MethodOptions, cfg: QuantConfig) -> MethodOptions:
        """Every knob left to derive (None), from the others and the config: the layout (shared or
        per layer, ``shared_by_default``), then vector length, channel groups, ``n_pq`` and outliers.
        ``n_pq`` per layer: the longest sub-vector (a divisor of vector_len) whose codebook at
        ceil(bits) bits per weight has at most AUTO_MAX_ENTRIES entries (1 at least)."""
        assert isinstance(options, VQOptions)
        o, width = options, math.ceil(cfg.bits - 1e-9)  # width >= 1: bits are at least 1
        shared = o.share_codebooks if o.share_codebooks is not None else shared_by_default(o, cfg)
        v = o.vector_len
        if v is None:
            v = max(1, SHARED_INDEX_BITS // width) if shared else PER_LAYER_VECTOR_LEN
        n_pq = o.n_pq
        if n_pq is None and shared:
            n_pq = 1
        elif n_pq is None:
            fits = [d for d in range(1, v + 1) if v % d == 0 and 2 ** (width * d) <= AUTO_MAX_ENTRIES]
            n_pq = v // max(fits, default=1)
        return dataclasses.replace(
            o,
            share_codebooks=shared,
            vector_len=v,
            n_pq=n_pq,
            n_groups=o.n_groups if o.n_groups is not None else 1 if shared else PER_LAYER_GROUPS,
            outliers=o.outliers if o.outliers is not None else DEFAULT_OUTLIERS,
        )

    def validate(self, cfg: QuantConfig) -> None:
        o = cfg.options_as(VQOptions)
        o.check_split()  # a derived vector_len meets a given n_pq only here
        if cfg.bits * o.sub_dim > MAX_INDEX_BITS + 1e-9:
            raise ConfigError(
                f"{cfg.bits:g} bits with sub-vectors of {o.sub_dim} needs codebooks of 2^{cfg.bits * o.sub_dim:g} "
                f"entries; at most 2^{MAX_INDEX_BITS} are supported: lower bits or use a shorter vector_len / more n_pq"
            )
        if o.shared:
            if o.allocation != "uniform" or o.budget != "index" or not float(cfg.bits).is_integer():
                raise ConfigError(
                    "share_codebooks needs --allocation uniform, --budget index and whole --bits "
                    f"(got {o.allocation}, {o.budget}, {cfg.bits:g}): every layer of a type must use "
                    "codebooks of one size"
                )
            if cfg.calib_inputs == "quantized":
                raise ConfigError("share_codebooks fits on the float model's statistics: use --calib-inputs fp")
        lo, hi = o.group_bit_range(cfg.bits)
        if lo > hi:
            cap = "" if hi != MAX_INDEX_BITS // o.sub_dim else f" (sub-vectors of {o.sub_dim} allow at most {hi})"
            raise ConfigError(f"min_group_bits {lo} exceeds max_group_bits {hi}{cap}")
        if not lo <= cfg.bits <= hi:
            raise ConfigError(f"bits {cfg.bits:g} is outside the per-group range [{lo}, {hi}]")

    def check_layers(self, cfg: QuantConfig, shapes: dict[str, tuple[int, int]]) -> None:
        """Under ``budget="effective"`` every layer must fit --bits with all its groups at the lowest
        bits; otherwise its codebooks alone are too large for it, and no allocation can help."""
        o = cfg.options_as(VQOptions)
        if o.budget != "effective":
            return
        from rsavq_core.algorithms.allocation import group_bounds  # torch: only once a model is loaded
        from rsavq_core.algorithms.vq_targets import effective_budget

        lo, _ = o.group_bit_range(cfg.bits)
        for name, (m, n) in shapes.items():
            cost, budget = effective_budget(m, n, cfg)
            least = sum(cost(stop - start, lo) for start, stop in group_bounds(n, o.channel_groups))
            if least > budget:
                raise ConfigError(
                    f"{name} ({m} x {n}) cannot meet {cfg.bits:g} stored bits per weight: with every channel "
                    f"group at {lo} bit(s) it needs {(least + cfg.bits * m * n - budget) / (m * n):.3f} "
                    "(codebooks and permutation included); raise --bits, or use fewer --n-groups or shorter sub-vectors"
                )

    def statistics(self, cfg: QuantConfig) -> StatsNeeds:
        o = cfg.options_as(VQOptions)
        return StatsNeeds(
            gradients=o.lam > 0 or o.allocation != "uniform" or o.metric == "fisher_diag",
            hessian=o.compensate or o.metric == "hessian" or o.refit == "output",
        )

    def quantize_layer(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stats: LayerStats | None,
        cfg: QuantConfig,
        shared: Any = None,
    ) -> tuple[QuantizedLayer, dict[str, Any]]:
        from rsavq_core.algorithms.vq import quantize_vq

        layer, report = quantize_vq(weight, stats, cfg, bias, shared)
        return layer, report.as_dict()

    def shared_fit(self, cfg: QuantConfig, layers_per_type: int) -> SharedFit | None:
        if not cfg.options_as(VQOptions).shared:
            return None
        from rsavq_core.algorithms.shared_codebooks import SharedCodebookFit

        return SharedCodebookFit(cfg, layers_per_type)
