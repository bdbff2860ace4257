"""``QuantLinear``: a quantized nn.Linear replacement for any registered layer format.

The layer's packed tensors live in buffers (so ``.to(device)`` moves them); which buffers, and how
they become a weight, is its format's business (``rsavq_core.formats``). On a CUDA device (or on
CPU with ``RSAVQ_KERNELS=interpret``) a format with kernels runs through them (``kernels.dispatch``:
fused GEMV for decode, dequantize + GEMM for prefill) and the weight is never kept expanded.
Everywhere else the reference path dequantizes the weight once, caches it and calls ``F.linear``
(on CPU that is faster than dequantizing per call).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kernels.dispatch import KernelPolicy, kernel_linear, kernel_supported
from rsavq_core.errors import ConfigError
from rsavq_core.formats.base import QuantizedLayer
from rsavq_core.formats.registry import format_of
from rsavq_core.settings import CoreSettings, get_settings

_policy: tuple[CoreSettings, KernelPolicy] | None = None


def kernel_policy() -> KernelPolicy:
    """The process's kernel policy, built once per settings object (every forward asks for it)."""
    global _policy
    settings = get_settings()
    if _policy is None or _policy[0] is not settings:
        try:
            policy = KernelPolicy(settings.kernels, settings.gemv_max_tokens, settings.triton_interpret)
        except ValueError as exc:
            raise ConfigError(f"RSAVQ_KERNELS: {exc}") from exc
        _policy = (settings, policy)
    return _policy[1]


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored quantized, as its format's packed buffers.

    Buffers: the format's (VQ ``perm``, ``g<i>_codebooks``, ``g<i>_indices``; scalar ``codes``,
    ``scales``, ``zeros``; see each format) and ``bias`` [M] fp16 or None.

    With ``cache_weight`` (default) the dequantized weight is kept per (device, dtype) after the
    first forward on the reference path: on CPU, re-dequantizing per call costs more than the
    matmul itself. The cache is dropped whenever the module's tensors move or change (``.to``,
    ``.half``, load_state_dict).
    """

    def __init__(
        self, layer: QuantizedLayer, cache_weight: bool = True, packed: dict[str, torch.Tensor] | None = None
    ) -> None:
        """``packed`` optionally gives word streams already packed from this layer's codes
        (``PackedCheckpoint.packed``), which saves packing them again."""
        super().__init__()
        self.format = format_of(layer)
        self.kind = layer.kind
        self.out_features, self.in_features = layer.out_features, layer.in_features
        self.cache_weight = cache_weight
        self.spec = self.format.spec(layer)
        self._cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._kernel_layout: Any = None
        for name, tensor in self.format.buffers(layer, packed or {}).items():
            self.register_buffer(name, tensor)
        bias = layer.bias.detach().to(torch.float16) if layer.bias is not None else None
        self.register_buffer("bias", bias)

    def _format_buffers(self) -> dict[str, torch.Tensor]:
        return {name: t for name, t in self._buffers.items() if name != "bias" and t is not None}

    def _bias(self) -> torch.Tensor | None:
        """[M] float16 or None (``self.bias`` reads as any module attribute to a type checker)."""
        return self._buffers["bias"]

    def to_layer(self) -> QuantizedLayer:
        """The in-memory layer (unpacked indices/codes) on the buffers' device."""
        layer: QuantizedLayer = self.format.from_buffers(
            self.spec, self._format_buffers(), self.out_features, self.in_features, self._bias()
        )
        return layer

    @torch.no_grad()
    def _dense_weight(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The dequantized weight [M, N] of ``dtype`` on ``device`` (cached if ``cache_weight``)."""
        key = (torch.device(device), dtype)
        weight = self._cache.get(key)
        if weight is None:
            weight = self.to_layer().dequantize(dtype).to(device)
            if self.cache_weight:
                self._cache[key] = weight
        return weight

    def _packed(self) -> Any:
        """The format's kernel layout of this layer on the buffers' device, built once."""
        if self._kernel_layout is None:
            self._kernel_layout = self.format.kernel_layout(self)
        return self._kernel_layout

    def _uses_kernels(self, x: torch.Tensor) -> bool:
        if not self.format.kernel_ready(self.spec):
            return False
        device = next(iter(self._format_buffers().values())).device
        return kernel_supported(x, device, self.in_features, kernel_policy())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., N] floating -> [..., M] of x's dtype."""
        if self._uses_kernels(x):
            return kernel_linear(
                x,
                self._packed(),
                gemv=self.format.kernel_gemv,
                dequantize=self.format.kernel_dequantize,
                policy=kernel_policy(),
            )
        bias = self._bias()
        return F.linear(x, self._dense_weight(x.dtype, x.device), bias.to(x.dtype) if bias is not None else None)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantLinear:
        # .to() / .cuda() / .half() all go through _apply: a cached weight would be stale.
        self._cache.clear()
        self._kernel_layout = None
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # torch leaves Module._apply unannotated
        return self

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cache.clear()  # buffers are overwritten in place
        self._kernel_layout = None
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, cache_weight={self.cache_weight}"
        )
