"""The Triton VQ kernels against their pure-torch references.

On CPU they run in Triton's interpreter (marker ``interpret``, CI); on a GPU compiled (``gpu``).
Shapes are deliberately not multiples of the block sizes, and the layouts cover every bit width
the kernels take (code widths 1..24 bits) and mixed-width group layouts.
"""

from __future__ import annotations

import pytest
import torch

from kernels.vq_layout import MAX_CODE_BITS, build_packed_vq
from kernels.vq_reference import dequantize_reference, vq_linear_reference
from rsavq_core.formats.vq import packed_from_layer
from rsavq_core.formats.vq_layer import VQLayer
from tests.core.test_artifact import make_vq_layer

# (M, N, vector_len, n_pq, bits per group): d = vector_len / n_pq rows per code.
LAYOUTS = {
    "d3-mixed": (37, 130, 6, 2, [3, 2, 2, 1]),  # the paper's layout, WCSG groups of 4 widths
    "d3-2bit": (100, 67, 6, 2, [2]),
    "d3-4bit": (29, 40, 6, 2, [4, 3]),  # 12-bit codes, 4096-entry codebooks
    "d2-8bit": (21, 35, 4, 2, [8, 5]),  # 16-bit codes straddle words at every other code
    "d1-widths": (19, 90, 3, 3, [1, 2, 3, 4, 5, 6, 7, 8, 3]),  # scalar-like: code = bits
    "d4-5bit": (13, 50, 8, 2, [5, 6]),  # 20- and 24-bit codes (the widest the kernels take)
    "d8-1bit": (70, 33, 8, 1, [1, 2]),
    "d6-2bit": (30, 20, 6, 1, [2]),  # share_codebooks' layout: one 6-dim codebook, 4096 entries
}
ROW_SCALED = {"d3-mixed", "d2-8bit"}  # these also carry per-row scales
WITH_OUTLIERS = {"d3-2bit": 40, "d2-8bit": 9}  # and these sparse fp16 residuals


def _layer(name: str, seed: int = 0) -> VQLayer:
    m, n, v, n_pq, bits = LAYOUTS[name]
    return make_vq_layer(
        m, n, v, n_pq, bits, bias=True, seed=seed, row_scales=name in ROW_SCALED, outliers=WITH_OUTLIERS.get(name, 0)
    )


def _check(device: str, name: str, dtype: torch.dtype, batch: int) -> None:
    from kernels.vq_triton import vq_dequantize, vq_gemv

    layer = _layer(name)
    packed = packed_from_layer(layer, device, tile_cols=24)  # several tiles per group, ragged ends
    # The reference reproduces the in-memory layer exactly (same fp16 codewords).
    expected_w = layer.dequantize(torch.float32).to(device)
    assert torch.equal(dequantize_reference(packed, torch.float32), expected_w)
    weight = vq_dequantize(packed, dtype, block_m=16, block_k=8)
    assert weight.dtype == dtype
    if name in WITH_OUTLIERS and dtype != torch.float32:  # the residual is added in dtype: one rounding more
        torch.testing.assert_close(weight, expected_w.to(dtype), rtol=1e-3, atol=1e-3)
    else:
        assert torch.equal(weight, expected_w.to(dtype))

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, layer.in_features, generator=gen).to(device, dtype)
    y = vq_gemv(x, packed, block_m=16, block_k=8)
    assert y.shape == (batch, layer.out_features) and y.dtype == dtype
    exact = vq_linear_reference(x.double(), packed)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    scale = exact.abs().max().item()
    assert (y.double() - exact).abs().max().item() <= tol * max(scale, 1.0)


@pytest.mark.interpret
@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernels_match_reference_interpreted(name: str, dtype: torch.dtype) -> None:
    _check("cpu", name, dtype, batch=1 if dtype == torch.float16 else 3)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 4])
def test_kernels_match_reference_on_gpu(name: str, dtype: torch.dtype, batch: int) -> None:
    _check("cuda", name, dtype, batch)


def test_reference_matches_layer_dequantize() -> None:
    for name in LAYOUTS:
        layer = _layer(name, seed=3)
        packed = packed_from_layer(layer, tile_cols=7)
        assert torch.equal(dequantize_reference(packed, torch.float32), layer.dequantize(torch.float32)), name


def test_codes_wider_than_the_kernels_are_refused() -> None:
    book = torch.zeros(1, 1, 1, dtype=torch.float16)
    with pytest.raises(ValueError, match=f"{MAX_CODE_BITS}"):
        build_packed_vq(
            out_features=6,
            in_features=2,
            vector_len=3,
            n_pq=1,
            groups=[(9, 0, 2)],
            perm=torch.arange(2),
            codebooks=[book],
            words=[torch.zeros(1, dtype=torch.int32)],
        )
