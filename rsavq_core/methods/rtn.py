"""Round-to-nearest: grouped asymmetric integer codes, no calibration (``algorithms.scalar``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rsavq_core.config.knobs import MethodOptions, knob
from rsavq_core.errors import ConfigError
from rsavq_core.methods.registry import QuantMethod, StatsNeeds, register_method

if TYPE_CHECKING:
    import torch

    from rsavq_core.calibration.statistics import LayerStats
    from rsavq_core.config.quant_config import QuantConfig
    from rsavq_core.formats.base import QuantizedLayer


@dataclass(frozen=True)
class RTNOptions(MethodOptions):
    group_size: int = knob(64, "input channels sharing one fp16 scale and zero point", ge=1, le=2**20)


@register_method
class RTN(QuantMethod):
    name = "rtn"
    summary = "round-to-nearest integer codes, one scale and zero point per group of inputs"
    options_type = RTNOptions

    def validate(self, cfg: QuantConfig) -> None:
        if cfg.bits != int(cfg.bits):
            raise ConfigError(f"method {cfg.method} needs integer bits, got {cfg.bits:g}")

    def statistics(self, cfg: QuantConfig) -> StatsNeeds:
        return StatsNeeds()

    def quantize_layer(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stats: LayerStats | None,
        cfg: QuantConfig,
        shared: Any = None,
    ) -> tuple[QuantizedLayer, dict[str, Any]]:
        from rsavq_core.algorithms.scalar import rtn_quantize

        started = time.perf_counter()
        layer = rtn_quantize(weight.float(), int(cfg.bits), cfg.options_as(RTNOptions).group_size, bias=bias)
        return layer, {"bits": [int(cfg.bits)], "seconds": time.perf_counter() - started}
