"""A new method and a new layer format, added from this test module alone, run end to end.

Nothing in the library knows them: the pipeline, the packed checkpoint, the bit counter, QuantLinear
and the command line find them through the registries.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
import torch

from kernels.packing import pack_codes, unpack_codes
from rsavq_core.checkpoint.bitcount import model_bits
from rsavq_core.config.knobs import MethodOptions, knob
from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.errors import ConfigError
from rsavq_core.formats.base import BitCount, LayerFormat, LayerReader, packed_stream, stream_bits
from rsavq_core.formats.registry import register_format, unregister_format
from rsavq_core.methods.registry import QuantMethod, StatsNeeds, register_method, unregister_method
from rsavq_core.pipeline.placement import Placement
from rsavq_core.pipeline.quantize import quantize_model
from rsavq_core.runtime import QuantLinear, load_quantized_model
from service.cli import main

KIND = "test-sign"

WHOLE = Placement(stream=False)  # these tests compare with the float model, which a streamed run never holds


@dataclass
class SignLayer:
    """W[m, n] = scale[m] * (+1 if sign[m, n] else -1): one bit per weight, one fp16 scale per row."""

    out_features: int
    in_features: int
    signs: torch.Tensor  # [M, N] uint8 in {0, 1}
    scales: torch.Tensor  # [M] float16
    bias: torch.Tensor | None = None  # [M] float16
    kind: str = field(default=KIND, init=False)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.signs.to(dtype) * 2 - 1) * self.scales.to(dtype)[:, None]


class SignFormat(LayerFormat):
    kind = KIND

    def manifest(self, layer: SignLayer) -> dict[str, Any]:
        return {}

    def tensors(self, layer: SignLayer) -> dict[str, torch.Tensor]:
        return {"signs": pack_codes(layer.signs, 1), "scales": layer.scales.to(torch.float16)}

    def read(self, reader: LayerReader, out_features: int, in_features: int, bias: torch.Tensor | None) -> SignLayer:
        m, n = out_features, in_features
        signs = reader.codes("signs", m * n, 1).reshape(m, n).to(torch.uint8)
        return SignLayer(m, n, signs, reader.take("scales", (m,), (torch.float16,)), bias)

    def stored_bits(self, layer: SignLayer) -> BitCount:
        m, n = layer.out_features, layer.in_features
        code_bits, pad = stream_bits(m * n, 1)
        bias_bits = 16 * m if layer.bias is not None else 0
        return BitCount(weights=m * n, index_bits=code_bits, scale_bits=16 * m, padding_bits=pad, bias_bits=bias_bits)

    def spec(self, layer: SignLayer) -> dict[str, Any]:
        return {}

    def buffers(self, layer: SignLayer, packed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"signs": packed_stream(packed, "signs", layer.signs, 1), "scales": layer.scales}

    def from_buffers(
        self, spec: dict[str, Any], buffers: Mapping[str, torch.Tensor], out_features: int, in_features: int,
        bias: torch.Tensor | None,
    ) -> SignLayer:  # fmt: skip
        signs = unpack_codes(buffers["signs"], 1, out_features * in_features).reshape(out_features, in_features)
        return SignLayer(out_features, in_features, signs.to(torch.uint8), buffers["scales"], bias)


@dataclass(frozen=True)
class SignOptions(MethodOptions):
    scale_rule: Literal["mean", "rms"] = knob("mean", "row scale: mean |w| or root mean square")


class SignMethod(QuantMethod):
    name = KIND
    summary = "one sign bit per weight and a scale per row (a test method)"
    options_type: ClassVar[type[MethodOptions]] = SignOptions

    def validate(self, cfg: QuantConfig) -> None:
        if cfg.bits != 1:
            raise ConfigError(f"{KIND} stores exactly 1 bit per weight, got {cfg.bits:g}")

    def statistics(self, cfg: QuantConfig) -> StatsNeeds:
        return StatsNeeds()

    def quantize_layer(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: Any, cfg: QuantConfig, shared: Any = None
    ) -> tuple[SignLayer, dict[str, Any]]:
        w = weight.detach().float()
        rule = cfg.options_as(SignOptions).scale_rule
        scales = w.abs().mean(1) if rule == "mean" else w.pow(2).mean(1).sqrt()
        half_bias = None if bias is None else bias.detach().half()
        layer = SignLayer(w.shape[0], w.shape[1], (w >= 0).to(torch.uint8), scales.half(), half_bias)
        return layer, {"bits": [1], "rule": rule}


@pytest.fixture
def registered() -> Iterator[None]:
    register_format(SignFormat)
    register_method(SignMethod)
    yield
    unregister_method(KIND)
    unregister_format(KIND)


@pytest.fixture
def tiny_folder(tiny_llama: Any, tmp_path: Path) -> Path:
    model, tokenizer = tiny_llama
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_new_method_and_format_run_end_to_end(registered: None, tiny_folder: Path, tmp_path: Path) -> None:
    cfg = QuantConfig.for_method(KIND, bits=1, scale_rule="rms")
    result = quantize_model(str(tiny_folder), cfg, out_dir=tmp_path / "packed", placement=WHOLE)
    assert len(result.layers) == 14 and all(isinstance(layer, SignLayer) for layer in result.layers.values())
    assert all(r == {"bits": [1], "rule": "rms"} for r in result.reports.values())

    # bpw from the format's own count: 1 bit per weight + a 16-bit scale per row (+ word padding).
    bits = model_bits(result.layers, result.model)
    weights = sum(layer.out_features * layer.in_features for layer in result.layers.values())
    rows = sum(layer.out_features for layer in result.layers.values())
    assert bits["quantized"]["bpw"] == pytest.approx((weights + 16 * rows) / weights)

    loaded, tokenizer, checkpoint = load_quantized_model(tmp_path / "packed")
    assert checkpoint.config == cfg and checkpoint.metadata["method"] == KIND
    assert all(isinstance(loaded.get_submodule(name), QuantLinear) for name in result.layers)
    for name, layer in result.layers.items():
        back = checkpoint.layers[name]
        assert isinstance(back, SignLayer) and isinstance(layer, SignLayer) and torch.equal(back.signs, layer.signs)
        assert torch.equal(back.scales, layer.scales)

    reference = copy.deepcopy(result.model)  # the float model with the dequantized weights in place
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.half().float())  # what the checkpoint stores for the other tensors
        for name, layer in result.layers.items():
            reference.get_parameter(f"{name}.weight").copy_(layer.dequantize())
        ids = tokenizer("Signs and scales.", return_tensors="pt").input_ids
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def test_the_command_line_offers_the_new_method_and_its_option(
    registered: None, tiny_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["quantize", str(tiny_folder), "--method", KIND, "--bits", "1", "--scale-rule", "mean", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["config"] == {**QuantConfig.for_method(KIND, bits=1).to_dict(), "scale_rule": "mean"}
    assert main(["quantize", str(tiny_folder), "--method", KIND, "--bits", "2", "--quiet"]) == 2
    assert "exactly 1 bit" in capsys.readouterr().err


def test_a_method_cannot_take_another_methods_option(registered: None) -> None:
    with pytest.raises(ConfigError, match="has no option scale_rule.*test-sign"):
        QuantConfig.for_method("rtn", bits=4, scale_rule="rms")


def test_registering_a_clashing_option_type_fails() -> None:
    @dataclass(frozen=True)
    class Clash(MethodOptions):
        group_size: str = knob("64", "same name as rtn's integer option, another type")

    class ClashMethod(SignMethod):
        name = "test-clash"
        options_type = Clash

    with pytest.raises(TypeError, match="group_size"):
        register_method(ClashMethod)
