"""Bits-per-weight accounting: spec §9 numbers, hand-counted layers, and agreement with the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from rsavq_core.checkpoint.bitcount import layer_bits, model_bits
from rsavq_core.checkpoint.packed import WEIGHTS_FILE, save_checkpoint
from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.errors import ConfigError
from rsavq_core.formats.base import BitCount
from rsavq_core.formats.registry import get_format
from rsavq_core.formats.vq_layer import ideal_vq_bpw
from rsavq_core.pipeline.resume import FinishedLayers
from tests.core.test_artifact import make_scalar_layer, make_vq_layer, tiny_layers


@pytest.mark.parametrize(
    ("vector_len", "expected"), [(4, 2.0002), (6, 2.0015), (8, 2.0078), (10, 2.0391), (12, 2.1875), (14, 2.8750)]
)
def test_ideal_bpw_reproduces_spec_table_7(vector_len: int, expected: float) -> None:
    bpw = ideal_vq_bpw(4096, 4096, [2, 2, 2, 2], [1024] * 4, vector_len // 2, 2)
    assert round(bpw, 4) == expected


def test_ideal_bpw_three_bits() -> None:
    assert round(ideal_vq_bpw(4096, 4096, [3] * 4, [1024] * 4, 3, 2), 4) == 3.0117


def test_ideal_bpw_rejects_inconsistent_groups() -> None:
    with pytest.raises(ConfigError):
        ideal_vq_bpw(16, 16, [2, 2], [8, 4], 3, 2)
    with pytest.raises(ConfigError):
        ideal_vq_bpw(16, 16, [2], [8, 8], 3, 2)


def test_real_4096_layer_matches_ideal() -> None:
    m = n = 4096
    layer = make_vq_layer(m, n, 6, 2, [2, 2, 2, 2])
    count = layer_bits(layer)
    ideal = ideal_vq_bpw(m, n, [2, 2, 2, 2], [1024] * 4, 3, 2)
    assert round(ideal, 4) == 2.0015
    assert (count.index_bits + count.codebook_bits) / count.weights == ideal
    assert count.weights == m * n
    assert count.index_bits == m * n * 2
    assert count.perm_bits == 16 * 4096
    # 4096 rows pad to 683 * 6 = 4098: 2 extra rows per column at 2 bits each. Each group stream is
    # 1024 * 683 * 2 codes of 6 bits = 262,272 whole words, so no word padding.
    assert count.padding_bits == 2 * n * 2
    assert count.total_bits == count.index_bits + count.codebook_bits + 16 * 4096 + 2 * n * 2
    assert count.bpw == pytest.approx(ideal + (16 * 4096 + 4 * n) / (m * n), abs=0)


def test_hand_counted_vq_layer_with_row_and_word_padding() -> None:
    # M=10, v=4, d=2: 3 vectors (12 rows). g0: 4 cols, 2 bits -> 24 codes x 4 bits = 96 bits (3 words);
    # g1: 3 cols, 1 bit -> 18 codes x 2 bits = 36 bits in 2 words (28 bits of word padding).
    layer = make_vq_layer(10, 7, 4, 2, [2, 1], bias=True)
    assert [(g.start, g.stop) for g in layer.groups] == [(0, 4), (4, 7)]
    count = layer_bits(layer)
    assert count.index_bits == 10 * 4 * 2 + 10 * 3 * 1
    assert count.padding_bits == (96 - 80) + (36 - 30) + 28
    assert count.codebook_bits == (2 * 16 * 2 + 2 * 4 * 2) * 16
    assert count.perm_bits == 7 * 16
    assert count.bias_bits == 10 * 16
    assert count.total_bits == 110 + 50 + 1280 + 112  # bias excluded
    assert count.bpw == count.total_bits / 70


def test_scalar_layer() -> None:
    count = layer_bits(make_scalar_layer(5, 10, 3, 4))
    assert count.index_bits == 150
    assert count.padding_bits == 160 - 150
    assert count.scale_bits == 2 * 16 * 5 * 3
    assert count.perm_bits == count.codebook_bits == count.bias_bits == 0


def test_perm_of_wide_layer_is_int32() -> None:
    layer = make_vq_layer(2, 32768, 2, 1, [1])
    assert layer_bits(layer).perm_bits == 32768 * 32


def test_add() -> None:
    a = BitCount(weights=10, index_bits=20, codebook_bits=5, bias_bits=7)
    b = BitCount(weights=30, index_bits=60, perm_bits=3, padding_bits=2)
    s = a + b
    assert s == BitCount(weights=40, index_bits=80, codebook_bits=5, perm_bits=3, bias_bits=7, padding_bits=2)
    assert s.bpw == 90 / 40


def test_counts_match_stored_tensors(tmp_path: Path, tiny_llama: Any) -> None:
    """layer_bits counts exactly the bits the checkpoint stores for each layer (bias aside)."""
    model, _ = tiny_llama
    layers = tiny_layers(model)
    out = save_checkpoint(
        tmp_path / "c", model=model, tokenizer=None, layers=layers, config=QuantConfig(), source_model="tiny"
    )
    data = load_file(str(out / WEIGHTS_FILE))
    for name, layer in layers.items():
        stored = {k: v for k, v in data.items() if k.startswith(f"{name}.")}
        bias_bits = stored.pop(f"{name}.bias").numel() * 16 if layer.bias is not None else 0
        bits = sum(t.numel() * t.element_size() * 8 for t in stored.values())
        count = layer_bits(layer)
        assert bits == count.total_bits, name
        assert bias_bits == count.bias_bits, name


def test_model_bits(tiny_llama: Any) -> None:
    model, _ = tiny_llama
    layers = tiny_layers(model)
    report = model_bits(layers, model)
    total = BitCount(weights=0)
    for layer in layers.values():
        total = total + layer_bits(layer)
    assert report["quantized"]["bpw"] == total.bpw
    assert report["layers"] == {name: layer_bits(layer).bpw for name, layer in layers.items()}
    # The tiny LLaMA's linears have no bias; the tied lm_head is one parameter.
    n_params = sum(p.numel() for p in model.parameters())
    n_bias = sum(layer.bias.numel() for layer in layers.values() if layer.bias is not None)
    assert report["n_params"] == n_params + n_bias
    other = n_params - total.weights
    expected = (total.total_bits + n_bias * 16 + other * 16) / (n_params + n_bias)
    assert report["all_bpw"] == pytest.approx(expected, rel=1e-12)
    assert report["quantized"]["bpw"] < report["all_bpw"] < 16
    # Quantizing nothing leaves a pure fp16 model.
    assert model_bits({}, model)["all_bpw"] == 16.0


def test_an_identity_permutation_is_neither_stored_nor_counted(tmp_path: Path) -> None:
    """Uniform bits keep the column order: 16 bits per input column saved (0.0226 bpw on SmolLM2)."""
    layer = make_vq_layer(12, 20, 6, 2, [2, 2])
    layer.perm = torch.arange(20)
    vq = get_format("vq")
    assert "perm" not in vq.tensors(layer) and vq.manifest(layer)["identity_perm"] is True
    assert layer_bits(layer).perm_bits == 0
    ckpt = FinishedLayers(tmp_path, QuantConfig.for_method("rsavq", bits=2), "fp")
    ckpt.save("layer", layer, {})
    loaded = ckpt.load("layer")
    assert loaded is not None and torch.equal(loaded[0].perm, torch.arange(20))  # type: ignore[attr-defined]
    assert torch.equal(loaded[0].dequantize(), layer.dequantize())
