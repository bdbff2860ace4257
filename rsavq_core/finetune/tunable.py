"""What fine-tuning trains, with codes fixed: a quantized linear as a module whose weight is its
format's dequantization of trainable tensors, the normalisation weights beside it, and rounding
both back to the precision the checkpoint stores them in. Shared by block-wise and end-to-end
fine-tuning.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from rsavq_core.checkpoint.packed import OTHER_TENSORS_DTYPE
from rsavq_core.formats.base import LayerFormat, QuantizedLayer


class TunedLinear(nn.Module):
    """A linear whose weight is its format's dequantization of trainable tensors."""

    def __init__(
        self,
        layer_format: LayerFormat,
        layer: QuantizedLayer,
        tunable: Mapping[str, torch.Tensor],
        tied: Mapping[str, nn.Parameter] | None = None,
    ) -> None:
        """``tied``: parameters other layers use too (shared codebooks), by their name in the
        format's tunable tensors; held, not registered, so that whoever ties them counts them once."""
        super().__init__()
        self.layer_format, self.layer = layer_format, layer
        self.tunable = nn.ParameterDict({k.replace(".", "_"): nn.Parameter(v) for k, v in tunable.items()})
        self.names = {k.replace(".", "_"): k for k in tunable}
        self.tied = dict(tied or {})
        self.bias_value = None if layer.bias is None else layer.bias.float()

    def values(self) -> dict[str, torch.Tensor]:
        return {**self.tied, **{self.names[k]: p for k, p in self.tunable.items()}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.layer_format.dequantize_with(self.layer, self.values())
        bias = None if self.bias_value is None else self.bias_value.to(x.dtype)
        return F.linear(x, weight.to(x.dtype), bias)


def norm_parameters(module: nn.Module, quantized: set[str]) -> dict[str, nn.Parameter]:
    """The 1-D float parameters outside the quantized linears (names relative to ``module``):
    normalisation weights (and biases of layers left in float); few, cheap, stored in float."""
    return {
        name: p
        for name, p in module.named_parameters()
        if p.dim() == 1 and p.is_floating_point() and not _inside(name, quantized)
    }


def _inside(name: str, modules: set[str]) -> bool:
    """Whether parameter ``name`` belongs to one of ``modules`` or to a submodule of one (a layer
    already swapped for a TunedLinear holds its row scales as ``<layer>.tunable.row_scale``)."""
    owner = name.rpartition(".")[0]
    while owner:
        if owner in modules:
            return True
        owner = owner.rpartition(".")[0]
    return False


def round_norms(norms: Mapping[str, nn.Parameter]) -> None:
    """Round trained normalisation weights in place to the precision the checkpoint stores them in."""
    with torch.no_grad():
        for p in norms.values():
            p.copy_(p.to(OTHER_TENSORS_DTYPE))


def round_tuned(modules: Mapping[str, TunedLinear]) -> dict[str, QuantizedLayer]:
    """Each tuned layer as its format stores it, and the modules' values rounded to match (so that
    what is measured afterwards is what is stored)."""
    out = {}
    for name, module in modules.items():
        out[name] = module.layer_format.with_tuned(module.layer, {k: v.detach() for k, v in module.values().items()})
        stored = module.layer_format.tunable(out[name])
        tied = module.layer_format.shared_tunable(out[name])
        with torch.no_grad():
            for key, parameter in module.tunable.items():  # by name: a ParameterDict need not keep order
                parameter.copy_(stored[module.names[key]])
            for local, parameter in module.tied.items():  # every sharer stores the same rounded values
                parameter.copy_(tied[local][1])
    return out
