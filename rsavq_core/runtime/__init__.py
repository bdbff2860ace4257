"""Running quantized models: ``QuantLinear``, loading a packed checkpoint, generation."""

from rsavq_core.runtime.loading import load_quantized_model, quantize_in_place
from rsavq_core.runtime.qlinear import QuantLinear, kernel_policy

__all__ = ["QuantLinear", "kernel_policy", "load_quantized_model", "quantize_in_place"]
