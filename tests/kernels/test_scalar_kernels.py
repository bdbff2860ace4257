"""The Triton scalar (RTN/GPTQ) kernels against their pure-torch reference, every code width 1..8."""

from __future__ import annotations

import pytest
import torch

from kernels.packing import pack_codes
from kernels.scalar_reference import PackedScalar, dequantize_scalar_reference, scalar_linear_reference
from rsavq_core.runtime import QuantLinear
from tests.core.test_artifact import make_scalar_layer

# (M, N, bits, group_size): nothing a multiple of the block sizes; groups that do not divide N.
LAYOUTS = [
    (37, 130, bits, gs) for bits, gs in ((1, 64), (2, 64), (3, 40), (4, 128), (5, 17), (6, 64), (7, 33), (8, 130))
] + [(200, 45, 2, 16)]


def _packed(m: int, n: int, bits: int, group_size: int, device: str) -> tuple[PackedScalar, torch.Tensor]:
    layer = make_scalar_layer(m, n, bits, group_size, bias=True, seed=bits)
    assert layer.bias is not None
    packed = PackedScalar(
        m,
        n,
        bits,
        group_size,
        pack_codes(layer.codes, bits).to(device),
        layer.scales.to(device),
        layer.zeros.to(device),
        layer.bias.to(device),
    )
    return packed, layer.dequantize(torch.float32).to(device)


def _check(device: str, layout: tuple[int, int, int, int], dtype: torch.dtype, batch: int) -> None:
    from kernels.scalar_triton import scalar_dequantize, scalar_gemv

    packed, expected_w = _packed(*layout, device)
    assert torch.equal(dequantize_scalar_reference(packed, torch.float32), expected_w)
    # fp32 arithmetic on fp16 inputs is exact here; one rounding to dtype at the end.
    torch.testing.assert_close(scalar_dequantize(packed, dtype, 16, 16), expected_w.to(dtype), rtol=1e-3, atol=1e-6)
    x = torch.randn(batch, layout[1], generator=torch.Generator().manual_seed(0)).to(device, dtype)
    y = scalar_gemv(x, packed, block_m=16, block_k=16, tile_k=32)
    exact = scalar_linear_reference(x.double(), packed)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert (y.double() - exact).abs().max().item() <= tol * max(exact.abs().max().item(), 1.0)


@pytest.mark.interpret
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "x".join(map(str, t)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scalar_kernels_match_reference_interpreted(layout: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    _check("cpu", layout, dtype, batch=2)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "x".join(map(str, t)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch", [1, 4])
def test_scalar_kernels_match_reference_on_gpu(
    layout: tuple[int, int, int, int], dtype: torch.dtype, batch: int
) -> None:
    _check("cuda", layout, dtype, batch)


@pytest.mark.interpret
@pytest.mark.parametrize("tokens", [1, 7])
def test_quantlinear_scalar_through_kernels(rsavq_settings, tokens: int) -> None:
    rsavq_settings(kernels="interpret")
    layer = make_scalar_layer(33, 70, 3, 32, bias=True, seed=1)
    assert layer.bias is not None
    qlin = QuantLinear(layer)
    x = torch.randn(tokens, 70)
    torch.testing.assert_close(qlin(x), torch.nn.functional.linear(x, layer.dequantize(), layer.bias.float()))
    assert qlin._cache == {} and isinstance(qlin._kernel_layout, PackedScalar)


def test_bad_scalar_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        PackedScalar(4, 8, 4, 4, torch.zeros(3, dtype=torch.int32), torch.ones(4, 2), torch.zeros(4, 2), None)
    with pytest.raises(ValueError, match="scales/zeros"):
        PackedScalar(4, 8, 4, 4, torch.zeros(4, dtype=torch.int32), torch.ones(4, 3), torch.zeros(4, 3), None)
