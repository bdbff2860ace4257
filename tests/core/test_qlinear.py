"""QuantLinear against F.linear on the dequantized weight, its cache, and checkpoint loading end to end."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kernels.packing import pack_codes
from rsavq_core.checkpoint.packed import save_checkpoint
from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.errors import ConfigError, UnsupportedShapeError
from rsavq_core.formats.base import QuantizedLayer
from rsavq_core.formats.scalar import ScalarLayer
from rsavq_core.models.layout import quantizable_linears
from rsavq_core.runtime import QuantLinear, load_quantized_model, quantize_in_place
from tests.core.test_artifact import assert_same_layer, make_scalar_layer, make_vq_layer

LAYERS: dict[str, Callable[[], QuantizedLayer]] = {
    "vq": lambda: make_vq_layer(10, 7, 4, 2, [2, 1], bias=True, seed=5),
    "vq_mixed": lambda: make_vq_layer(24, 48, 6, 2, [3, 2, 2, 1], seed=6),
    "vq_row_scales": lambda: make_vq_layer(13, 20, 6, 3, [2, 1], bias=True, seed=8, row_scales=True),
    "vq_outliers": lambda: make_vq_layer(13, 20, 6, 2, [2, 1], seed=9, row_scales=True, outliers=11),
    "scalar": lambda: make_scalar_layer(9, 20, 4, 8, bias=True, seed=7),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_equals_linear_on_dequantized_weight(kind: str, dtype: torch.dtype) -> None:
    layer = LAYERS[kind]()
    qlin = QuantLinear(layer)
    x = torch.randn(3, 5, layer.in_features, dtype=dtype)
    bias = layer.bias.to(dtype) if layer.bias is not None else None
    expected = F.linear(x, layer.dequantize(dtype), bias)
    out = qlin(x)
    assert out.shape == (3, 5, layer.out_features) and out.dtype == dtype
    assert torch.equal(out, expected)
    assert_same_layer(layer, qlin.to_layer())


def test_buffers_are_packed_and_follow_the_module() -> None:
    qlin = QuantLinear(LAYERS["vq"]())
    names = {name for name, _ in qlin.named_buffers()}
    assert names == {"perm", "g0_codebooks", "g0_indices", "g1_codebooks", "g1_indices", "bias"}
    assert qlin.g0_indices.dtype == torch.int32
    assert list(qlin.parameters()) == []
    assert set(qlin.state_dict()) == names


def test_weight_cache_is_keyed_and_invalidated() -> None:
    layer = LAYERS["scalar"]()
    qlin = QuantLinear(layer)
    x = torch.randn(2, layer.in_features)
    first = qlin(x)
    assert list(qlin._cache) == [(torch.device("cpu"), torch.float32)]
    qlin(x.double())
    assert len(qlin._cache) == 2
    qlin.to(torch.float64)  # goes through _apply: the cache must be dropped
    assert qlin._cache == {}
    # Changing the buffers through load_state_dict must change the output, not serve a stale weight.
    state = qlin.state_dict()
    state["scales"] = state["scales"] * 2
    qlin.load_state_dict(state)
    assert torch.allclose(qlin(x.double()), 2 * first.double() - qlin.bias.double(), atol=1e-6)


def test_prepacked_words_are_used_and_checked() -> None:
    layer = LAYERS["scalar"]()
    assert isinstance(layer, ScalarLayer)
    words = pack_codes(layer.codes, layer.bits)
    qlin = QuantLinear(layer, packed={"codes": words})
    assert qlin.get_buffer("codes").data_ptr() == words.data_ptr()  # taken as is, not packed again
    assert torch.equal(qlin.get_buffer("codes"), QuantLinear(layer).get_buffer("codes"))
    with pytest.raises(UnsupportedShapeError, match="packed codes"):
        QuantLinear(layer, packed={"codes": words[:-1]})


def test_cache_can_be_disabled() -> None:
    layer = LAYERS["vq"]()
    qlin = QuantLinear(layer, cache_weight=False)
    x = torch.randn(4, layer.in_features)
    assert torch.equal(qlin(x), QuantLinear(layer)(x))
    assert qlin._cache == {}


def test_quantize_in_place_checks_names_and_shapes(tiny_llama: Any) -> None:
    model = copy.deepcopy(tiny_llama[0])
    with pytest.raises(ConfigError, match="no module"):
        quantize_in_place(model, {"model.layers.0.nope": LAYERS["vq"]()})
    with pytest.raises(ConfigError, match="not an nn.Linear"):
        quantize_in_place(model, {"model.layers.0.mlp": LAYERS["vq"]()})
    with pytest.raises(UnsupportedShapeError, match="10x7"):
        quantize_in_place(model, {"model.layers.0.mlp.up_proj": LAYERS["vq"]()})


def rtn_layer(weight: torch.Tensor, bits: int, group_size: int) -> ScalarLayer:
    """Asymmetric round-to-nearest of weight [M, N] float32, per (row, group of input channels)."""
    m, n = weight.shape
    pad = -n % group_size
    w = F.pad(weight, (0, pad)).reshape(m, -1, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-6).half()
    zero = (-lo / scale.float()).round().half()
    idx = torch.arange(n) // group_size
    codes = (weight / scale.float()[:, idx] + zero.float()[:, idx]).round().clamp(0, 2**bits - 1)
    return ScalarLayer(m, n, bits, group_size, codes.to(torch.uint8), scale, zero)


def quantize_tiny(model: torch.nn.Module) -> dict[str, QuantizedLayer]:
    """Attention projections: random VQ (q_proj with a bias); MLP: 4-bit RTN of the real weights."""
    layers: dict[str, QuantizedLayer] = {}
    for i, (name, lin) in enumerate(quantizable_linears(model)):
        m, n = lin.weight.shape
        if ".self_attn." in name:
            layers[name] = make_vq_layer(m, n, 6, 2, [2, 1], bias=name.endswith("q_proj"), seed=i)
        else:
            layers[name] = rtn_layer(lin.weight.detach(), 4, 32)
    return layers


def test_end_to_end_save_and_load(tmp_path: Path, tiny_llama: Any) -> None:
    model, tokenizer = tiny_llama
    layers = quantize_tiny(model)
    assert len(layers) == 14
    out = save_checkpoint(
        tmp_path / "ckpt",
        model=model,
        tokenizer=tokenizer,
        layers=layers,
        config=QuantConfig.for_method("rsavq"),
        source_model="tiny-llama",
    )
    loaded, tok, art = load_quantized_model(out)
    assert not loaded.training
    assert set(art.layers) == set(layers)
    assert all(isinstance(loaded.get_submodule(name), QuantLinear) for name in layers)
    assert loaded.get_parameter("lm_head.weight") is loaded.get_parameter("model.embed_tokens.weight")
    assert tok is not None and len(tok) == len(tokenizer)

    # Reference: the FP model with its other params rounded through fp16 and the same layers swapped in.
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.half().float())
    quantize_in_place(ref, layers)
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        got, want, fp = loaded(ids).logits, ref(ids).logits, model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # The quantized layers really are in use: the FP model answers differently.
    assert (got - fp).abs().max() > 1e-3


def test_load_in_bfloat16(tmp_path: Path, tiny_llama: Any) -> None:
    model, tokenizer = tiny_llama
    layers = quantize_tiny(model)
    out = save_checkpoint(
        tmp_path / "ckpt", model=model, tokenizer=None, layers=layers, config=QuantConfig(), source_model="tiny-llama"
    )
    loaded32, tok, _ = load_quantized_model(out)
    loaded16, _, _ = load_quantized_model(out, dtype=torch.bfloat16)
    assert tok is None  # saved without a tokenizer
    assert loaded16.get_parameter("model.embed_tokens.weight").dtype == torch.bfloat16
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        lo, hi = loaded16(ids).logits, loaded32(ids).logits
    assert lo.dtype == torch.bfloat16
    torch.testing.assert_close(lo.float(), hi, rtol=0.05, atol=0.05)
