"""The scalar format: RTN / GPTQ integer codes with one fp16 scale and zero point per group.

Asymmetric integer codes with one fp16 scale and zero point per (row, group of ``group_size``
input channels): ``W = (code - zero) * scale``. Stored tensors of a layer ``<name>``:
``<name>.codes`` int32 words (``pack_codes`` of the [M, N] codes, ``bits`` per code),
``<name>.scales`` and ``<name>.zeros`` fp16 [M, ceil(N / group_size)]. Manifest fields: ``bits``,
``group_size``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from kernels.packing import pack_codes, unpack_codes
from kernels.scalar_reference import PackedScalar
from rsavq_core.formats.base import FP16_BITS, BitCount, LayerFormat, LayerReader, packed_stream, stream_bits
from rsavq_core.formats.registry import register_format

MAX_CODE_BITS = 8  # codes are held as uint8


@dataclass
class ScalarLayer:
    out_features: int  # M
    in_features: int  # N
    bits: int
    group_size: int
    codes: torch.Tensor  # [M, N] uint8, values in [0, 2**bits)
    scales: torch.Tensor  # [M, ceil(N / group_size)] float16
    zeros: torch.Tensor  # [M, ceil(N / group_size)] float16 (zero point in code units)
    bias: torch.Tensor | None = None  # [M] float16
    kind: str = field(default="scalar", init=False)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [M, N]: (code - zero) * scale, per (row, input-channel group)."""
        return self.dequantize_scales(self.scales.to(dtype))

    def dequantize_scales(self, scales: torch.Tensor) -> torch.Tensor:
        """The dense weight [M, N] with ``scales`` [M, groups] in place of the layer's (differentiable)."""
        idx = torch.arange(self.in_features, device=self.codes.device) // self.group_size
        return (self.codes.to(scales.dtype) - self.zeros.to(scales.dtype)[:, idx]) * scales[:, idx]


@register_format
class ScalarFormat(LayerFormat):
    kind = "scalar"

    def manifest(self, layer: ScalarLayer) -> dict[str, Any]:
        return {"bits": layer.bits, "group_size": layer.group_size}

    def tensors(self, layer: ScalarLayer) -> dict[str, torch.Tensor]:
        return {
            "codes": pack_codes(layer.codes.detach().cpu(), layer.bits),
            "scales": layer.scales.detach().to("cpu", torch.float16).contiguous(),
            "zeros": layer.zeros.detach().to("cpu", torch.float16).contiguous(),
        }

    def read(self, reader: LayerReader, out_features: int, in_features: int, bias: torch.Tensor | None) -> ScalarLayer:
        m, n = out_features, in_features
        bits, gs = reader.int_(reader.entry, "bits"), reader.int_(reader.entry, "group_size")
        if bits > MAX_CODE_BITS:
            raise reader.fail("bits", f"{bits} bits do not fit the uint8 codes of a scalar layer")
        codes = reader.codes("codes", m * n, bits).reshape(m, n).to(torch.uint8)
        n_groups = -(-n // gs)
        scales = reader.take("scales", (m, n_groups), (torch.float16,))
        zeros = reader.take("zeros", (m, n_groups), (torch.float16,))
        return ScalarLayer(m, n, bits, gs, codes, scales, zeros, bias)

    def stored_bits(self, layer: ScalarLayer) -> BitCount:
        m, n = layer.out_features, layer.in_features
        code_bits, word_pad = stream_bits(m * n, layer.bits)
        return BitCount(
            weights=m * n,
            index_bits=code_bits,
            scale_bits=(layer.scales.numel() + layer.zeros.numel()) * FP16_BITS,
            bias_bits=layer.bias.numel() * FP16_BITS if layer.bias is not None else 0,
            padding_bits=word_pad,
        )

    def tunable(self, layer: ScalarLayer) -> dict[str, torch.Tensor]:
        return {"scales": layer.scales.float().clone()}  # zero points stay integers in code units

    def dequantize_with(self, layer: ScalarLayer, tunable: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return layer.dequantize_scales(tunable["scales"])

    def with_tuned(self, layer: ScalarLayer, tunable: Mapping[str, torch.Tensor]) -> ScalarLayer:
        scales = tunable["scales"].detach().half()
        m, n = layer.out_features, layer.in_features
        return ScalarLayer(m, n, layer.bits, layer.group_size, layer.codes, scales, layer.zeros, layer.bias)

    def spec(self, layer: ScalarLayer) -> dict[str, Any]:
        return {"bits": layer.bits, "group_size": layer.group_size}

    def buffers(self, layer: ScalarLayer, packed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "codes": packed_stream(packed, "codes", layer.codes, layer.bits),
            "scales": layer.scales.detach().to(torch.float16),
            "zeros": layer.zeros.detach().to(torch.float16),
        }

    def from_buffers(
        self,
        spec: dict[str, Any],
        buffers: Mapping[str, torch.Tensor],
        out_features: int,
        in_features: int,
        bias: torch.Tensor | None,
    ) -> ScalarLayer:
        m, n, bits = out_features, in_features, spec["bits"]
        codes = unpack_codes(buffers["codes"], bits, m * n).reshape(m, n).to(torch.uint8)
        return ScalarLayer(m, n, bits, spec["group_size"], codes, buffers["scales"], buffers["zeros"], bias)

    def kernel_ready(self, spec: dict[str, Any]) -> bool:
        return True

    def kernel_layout(self, module: Any) -> PackedScalar:
        return PackedScalar(
            module.out_features,
            module.in_features,
            module.spec["bits"],
            module.spec["group_size"],
            module.codes,
            module.scales,
            module.zeros,
            module.bias,
        )

    def kernel_gemv(self, x: torch.Tensor, layout: PackedScalar) -> torch.Tensor:
        from kernels.scalar_triton import scalar_gemv

        return scalar_gemv(x, layout)

    def kernel_dequantize(self, layout: PackedScalar, dtype: torch.dtype) -> torch.Tensor:
        from kernels.scalar_triton import scalar_dequantize

        return scalar_dequantize(layout, dtype)
