"""RTN and GPTQ scalar baselines: layout, error bounds, partial groups, GPTQ beating RTN."""

from __future__ import annotations

import pytest
import torch

from rsavq_core.algorithms.linalg import hessian_relative_error as proxy_loss
from rsavq_core.algorithms.linalg import inverse_hessian_factor, reverse_in_place
from rsavq_core.algorithms.scalar import gptq_quantize, rtn_quantize
from rsavq_core.errors import CalibrationError, ConfigError, UnsupportedShapeError
from rsavq_core.formats.scalar import ScalarLayer


def _weight(m: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


def _correlated_hessian(n: int, tokens: int = 1024, seed: int = 1) -> torch.Tensor:
    """H = X^T X with X = Z A: a random mixing A makes H far from diagonal."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=gen) @ (torch.randn(n, n, generator=gen) / n**0.5)
    return x.T @ x


def _check_layout(layer: ScalarLayer, m: int, n: int, bits: int, group_size: int) -> None:
    n_groups = -(-n // group_size)
    assert (layer.out_features, layer.in_features) == (m, n)
    assert layer.codes.dtype == torch.uint8 and layer.codes.shape == (m, n)
    assert int(layer.codes.max()) < 2**bits
    for t in (layer.scales, layer.zeros):
        assert t.dtype == torch.float16 and t.shape == (m, n_groups)
    assert bool((layer.scales > 0).all())
    assert torch.equal(layer.zeros, layer.zeros.round())  # integer zero points
    assert layer.dequantize().shape == (m, n)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize(("m", "n", "group_size"), [(8, 576, 128), (5, 100, 64), (4, 64, 64), (3, 7, 1)])
def test_rtn_codes_and_error_bound(bits: int, m: int, n: int, group_size: int) -> None:
    w = _weight(m, n) * 0.05
    layer = rtn_quantize(w, bits, group_size)
    _check_layout(layer, m, n, bits, group_size)
    idx = torch.arange(n) // group_size
    half_step = layer.scales.float()[:, idx] / 2
    # The scale is rounded up to fp16, so the half-step bound holds up to float32 rounding only.
    assert bool(((w - layer.dequantize()).abs() <= half_step * (1 + 1e-5) + 1e-7).all())


@pytest.mark.parametrize(("n", "group_size"), [(576, 128), (100, 64)])
def test_rtn_partial_last_group_uses_only_its_columns(n: int, group_size: int) -> None:
    w = _weight(6, n)
    tail = (n // group_size) * group_size
    w[:, tail:] *= 1e-3  # a tiny partial group next to large full groups
    layer = rtn_quantize(w, 4, group_size)
    assert layer.scales.shape == (6, n // group_size + 1)
    assert float(layer.scales[:, -1].float().max()) < 1e-2 * float(layer.scales[:, 0].float().min())
    err = (w - layer.dequantize())[:, tail:].abs()
    assert float(err.max()) <= float(layer.scales[:, -1].float().max()) / 2 * (1 + 1e-5)


def test_rtn_constant_rows_are_exact_enough() -> None:
    rows = [torch.zeros(100), torch.full((100,), 0.37), torch.full((100,), -2.5), _weight(1, 100)[0]]
    w = torch.stack(rows)
    layer = rtn_quantize(w, 3, 32)
    deq = layer.dequantize()
    assert bool(torch.isfinite(deq).all())
    assert torch.equal(deq[0], torch.zeros(100))  # an all-zero group must not divide by zero
    torch.testing.assert_close(deq[1:3], w[1:3], rtol=1e-3, atol=0)


def test_rtn_bias_and_dtype() -> None:
    w = _weight(4, 32).to(torch.bfloat16)
    bias = torch.randn(4)
    layer = rtn_quantize(w, 4, 16, bias=bias)
    assert layer.bias is not None and layer.bias.dtype == torch.float16
    torch.testing.assert_close(layer.bias.float(), bias, rtol=1e-3, atol=1e-3)
    assert layer.dequantize(torch.float16).dtype == torch.float16
    assert rtn_quantize(w, 4.0, 16).bits == 4  # type: ignore[arg-type]  # QuantConfig.bits is a float


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(bits: int, act_order: bool) -> None:
    w, h = _weight(48, 192), _correlated_hessian(192)
    rtn = proxy_loss(w, rtn_quantize(w, bits, 64).dequantize(), h)
    layer, stats = gptq_quantize(w, h, bits, 64, act_order=act_order)
    _check_layout(layer, 48, 192, bits, 64)
    assert stats["proxy_loss"] == pytest.approx(proxy_loss(w, layer.dequantize(), h))
    assert stats["proxy_loss"] <= 0.9 * rtn
    assert stats["seconds"] >= 0 and stats["damping"] == 0.01


def test_gptq_identity_hessian_is_rtn() -> None:
    w = _weight(16, 100)
    rtn = rtn_quantize(w, 3, 32)
    layer, _ = gptq_quantize(w, torch.eye(100), 3, 32)
    assert torch.equal(layer.codes, rtn.codes)
    assert torch.equal(layer.scales, rtn.scales) and torch.equal(layer.zeros, rtn.zeros)


def test_gptq_act_order_uses_static_groups_in_original_order() -> None:
    w, h = _weight(16, 100), _correlated_hessian(100)
    rtn = rtn_quantize(w, 3, 32)
    layer, _ = gptq_quantize(w, h, 3, 32, act_order=True)
    # Group parameters come from the original weights, so they are RTN's; the codes differ.
    assert torch.equal(layer.scales, rtn.scales) and torch.equal(layer.zeros, rtn.zeros)
    assert not torch.equal(layer.codes, rtn.codes)


def test_gptq_result_does_not_depend_on_block_size() -> None:
    # g = 48 straddles every block boundary: group parameters must include pending updates.
    w, h = _weight(24, 100), _correlated_hessian(100)
    losses = [gptq_quantize(w, h, 3, 48, block_size=bs)[1]["proxy_loss"] for bs in (1, 7, 32, 128)]
    assert max(losses) == pytest.approx(min(losses), rel=1e-3)


def test_gptq_dead_column_is_zeroed() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(256, 64, generator=gen)
    x[:, 5] = 0.0  # an input channel that never fires
    w = _weight(8, 64)
    layer, stats = gptq_quantize(w, x.T @ x, 4, 16)
    deq = layer.dequantize()
    assert bool(torch.isfinite(deq).all()) and stats["dead_columns"] == 1
    assert torch.equal(deq[:, 5], torch.zeros(8))
    assert stats["proxy_loss"] < proxy_loss(w, rtn_quantize(w, 4, 16).dequantize(), x.T @ x)


def test_inverse_cholesky_matches_reference_route() -> None:
    # The reference factors H^-1 = cholesky_inverse(chol(H)) again; ours avoids forming H^-1.
    h = _correlated_hessian(64).double()
    upper, frac = inverse_hessian_factor(h, 0.01, what="a [1 x 64] layer")
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(64, dtype=torch.float64)
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    assert frac == 0.01
    torch.testing.assert_close(upper, ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("n", [1, 7, 64])
def testreverse_in_place_is_flip_in_small_chunks(n: int) -> None:
    m = torch.randn(n, n, dtype=torch.float64)
    expected = m.flip(0, 1)
    reverse_in_place(m, chunk=5)  # many chunks, the last one short, an odd middle element
    assert torch.equal(m, expected)


def test_inverse_cholesky_in_column_order_leaves_the_hessian_alone() -> None:
    h = _correlated_hessian(48)
    h[3, :] = h[:, 3] = 0.0  # a dead column: factored with diagonal 1
    order = torch.randperm(48, generator=torch.Generator().manual_seed(0))
    before = h.clone()
    upper, _ = inverse_hessian_factor(h, 0.01, what="a [1 x 48] layer", order=order)
    assert torch.equal(h, before)
    ref_h = h.double()[order][:, order]
    ref_h.diagonal()[ref_h.diagonal() == 0] = 1.0
    damped = ref_h + 0.01 * ref_h.diagonal().mean() * torch.eye(48, dtype=torch.float64)
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    torch.testing.assert_close(upper, ref, rtol=1e-8, atol=1e-10)


def test_gptq_retries_damping_then_gives_up() -> None:
    w = _weight(4, 2)
    mild = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # eigenvalues 4, -2: damping 10 x mean diag fixes it
    _, stats = gptq_quantize(w, mild, 4, 2)
    assert stats["damping"] == pytest.approx(10.0)
    hopeless = torch.tensor([[1.0, 100.0], [100.0, 1.0]])
    with pytest.raises(CalibrationError, match=r"\[4 x 2\] layer.*not positive definite"):
        gptq_quantize(w, hopeless, 4, 2)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"bits": 0}, ConfigError, r"bits must be an integer in \[1, 8\], got 0"),
        ({"bits": 9}, ConfigError, r"bits must be an integer in \[1, 8\], got 9"),
        ({"bits": 2.5}, ConfigError, "bits must be an integer, got 2.5"),
        ({"bits": True}, ConfigError, "bits must be an integer, got True"),
        ({"group_size": 0}, ConfigError, "group_size must be a positive integer, got 0"),
        ({"weight": torch.randn(8)}, UnsupportedShapeError, r"non-empty 2-D tensor \[out, in\], got \(8,\)"),
        ({"weight": torch.tensor([[1.0, float("nan")]])}, ConfigError, "contains NaN or Inf"),
        ({"bias": torch.randn(3)}, UnsupportedShapeError, r"bias must have shape \(4,\)"),
    ],
)
def test_rtn_bad_input(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    args: dict[str, object] = {"weight": torch.randn(4, 8), "bits": 4, "group_size": 4, **kwargs}
    with pytest.raises(error, match=message):
        rtn_quantize(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"hessian": torch.eye(7)}, UnsupportedShapeError, r"hessian must have shape \(8, 8\)"),
        ({"hessian": torch.full((8, 8), float("inf"))}, CalibrationError, "contains NaN or Inf"),
        ({"hessian": torch.zeros(8, 8)}, CalibrationError, "Hessian is zero"),
        ({"hessian": -torch.eye(8)}, CalibrationError, "negative diagonal"),
        ({"block_size": 0}, ConfigError, "block_size must be a positive integer"),
        ({"damping": 0.0}, ConfigError, r"damping must be a number in \(0, 10\]"),
        ({"bits": 12}, ConfigError, r"bits must be an integer in \[1, 8\]"),
    ],
)
def test_gptq_bad_input(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    args: dict[str, object] = {
        "weight": torch.randn(4, 8),
        "hessian": torch.eye(8),
        "bits": 4,
        "group_size": 4,
        **kwargs,
    }
    with pytest.raises(error, match=message):
        gptq_quantize(**args)  # type: ignore[arg-type]
