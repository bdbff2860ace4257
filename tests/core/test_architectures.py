"""The architecture matrix: tiny random models of every decoder type users bring (``tests.architectures``),
quantized, saved, loaded by our runtime and by transformers' ``from_pretrained``, used to generate
and evaluated. Mixture-of-experts types are refused with what would stay in float until their
experts are quantized."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.errors import UnsupportedModelError
from rsavq_core.evaluation.perplexity import perplexity
from rsavq_core.pipeline.quantize import QuantizeResult, quantize_model
from rsavq_core.runtime import QuantLinear, load_quantized_model
from tests.architectures import DENSE, MOE, save_tiny

SMALL_CALIBRATION: dict[str, Any] = {"calib_samples": 4, "calib_len": 32}
# The packed model against the float model built from its own dequantized weights: the same products
# in float32, so the logits agree to rounding (the reference path multiplies by that very weight).
LOGITS_RTOL = LOGITS_ATOL = 1e-5
# Every other method on one dense type; the default method on all of them.
OTHER_METHODS = {"gptq": {"group_size": 32}, "kmeans": {}, "rtn": {"group_size": 32}}


@dataclass
class Quantized:
    source: Path
    result: QuantizeResult
    out: Path


@pytest.fixture(scope="module")
def tokenizer(smol_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smol_dir))


def _quantize(tmp: Path, tokenizer: Any, model_type: str, method: str = "rsavq", **knobs: Any) -> Quantized:
    source = save_tiny(model_type, tokenizer, tmp / model_type)
    bits = 2 if method in ("rsavq", "kmeans") else 4
    cfg = QuantConfig.for_method(method, bits=bits, **SMALL_CALIBRATION, **knobs)
    out = tmp / f"{model_type}-{method}"
    return Quantized(source, quantize_model(str(source), cfg, out_dir=out), out)


def _dequantized_copy(model: nn.Module) -> nn.Module:
    """The float model of a loaded packed one: each QuantLinear replaced by an nn.Linear holding its
    dequantized weight (and bias)."""
    from rsavq_core.models.layout import replace_module

    names = [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name in names:
        q = model.get_submodule(name)
        assert isinstance(q, QuantLinear)
        bias = q._bias()
        dense = nn.Linear(q.in_features, q.out_features, bias=bias is not None)
        with torch.no_grad():
            dense.weight.copy_(q.to_layer().dequantize(torch.float32))
            if bias is not None:
                dense.bias.copy_(bias.float())
        replace_module(model, name, dense)
    return model


def _check_round_trip(q: Quantized, tokenizer: Any) -> None:
    """Loaded both ways, the same logits and tokens; against its dequantized float model, the same
    logits within ``LOGITS_RTOL`` / ``LOGITS_ATOL``; perplexity finite and near the float model's."""
    from transformers import AutoModelForCausalLM

    import rsavq_core  # noqa: F401 - registers the quantization method with transformers

    ours: Any
    ours, _, art = load_quantized_model(q.out)
    assert set(art.layers) == set(q.result.layers)
    theirs = AutoModelForCausalLM.from_pretrained(str(q.out), dtype=torch.float32).eval()
    for name in q.result.layers:
        assert isinstance(ours.get_submodule(name), QuantLinear), name
        assert isinstance(theirs.get_submodule(name), QuantLinear), name
    ids = tokenizer("Quantized models of every shape should still speak.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = ours(ids).logits
        torch.testing.assert_close(theirs(ids).logits, logits, rtol=0, atol=0)
        reference_model = _dequantized_copy(load_quantized_model(q.out)[0])
        reference = reference_model(ids).logits
        torch.testing.assert_close(logits, reference, rtol=LOGITS_RTOL, atol=LOGITS_ATOL)
        greedy = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": tokenizer.eos_token_id}
        tokens = ours.generate(ids, **greedy)
        assert torch.equal(theirs.generate(ids, **greedy), tokens)
    assert tokens.shape[1] == ids.shape[1] + 4
    float_model = AutoModelForCausalLM.from_pretrained(str(q.source), dtype=torch.float32).eval()
    quantized_ppl = perplexity(ours, tokenizer, n_windows=2, length=64)["ppl"]
    float_ppl = perplexity(float_model, tokenizer, n_windows=2, length=64)["ppl"]
    # Random weights predict near-uniformly: quantizing them may not make the model much worse.
    assert math.isfinite(quantized_ppl) and quantized_ppl < 1.5 * float_ppl, (quantized_ppl, float_ppl)


@pytest.mark.parametrize("model_type", DENSE)
def test_every_dense_architecture_quantizes_loads_and_generates(
    model_type: str, tmp_path: Path, tokenizer: Any, one_thread: None
) -> None:
    q = _quantize(tmp_path, tokenizer, model_type)
    coverage = q.result.coverage
    assert coverage["share"] >= 0.9 and coverage["quantized_weights"] > 0
    # what stays in float is named; none of it is a linear the run quantized
    assert not {name.rpartition(".")[0] for name in coverage["kept_float"]} & {
        full.split(".", 3)[-1] for full in q.result.layers
    }
    _check_round_trip(q, tokenizer)


@pytest.mark.parametrize("method", sorted(OTHER_METHODS))
def test_every_method_runs_on_a_fused_projection_architecture(
    method: str, tmp_path: Path, tokenizer: Any, one_thread: None
) -> None:
    q = _quantize(tmp_path, tokenizer, "phi3", method, **OTHER_METHODS[method])
    assert "model.layers.0.self_attn.qkv_proj" in q.result.layers
    _check_round_trip(q, tokenizer)


@pytest.mark.parametrize("model_type", ["opt", "gpt_neox", "gemma3_text"])
def test_streamed_runs_of_other_layouts_give_the_whole_runs_bytes(
    model_type: str, tmp_path: Path, tokenizer: Any, one_thread: None
) -> None:
    """OPT (``model.decoder.layers``, flattened MLP tokens), GPT-NeoX (``gpt_neox.layers``, fused
    ``query_key_value``), Gemma-3 (sliding-window layers, scaled embeddings): block by block from the
    files or loaded whole, the same packed bytes, with the gradient statistics of the default method."""
    from tests.core.test_streaming import quantize_both, sha256

    source = save_tiny(model_type, tokenizer, tmp_path / model_type)
    cfg = QuantConfig.for_method("rsavq", bits=2, preset="fast", kmeans_iters=2, n_groups=2, **SMALL_CALIBRATION)
    whole, streamed = quantize_both(source, cfg, tmp_path)
    assert streamed.model.get_parameter(next(iter(streamed.layers)) + ".weight").device.type == "meta"
    assert sha256(tmp_path / "stream") == sha256(tmp_path / "whole")


@pytest.mark.parametrize("model_type", MOE)
def test_a_model_whose_experts_are_not_linears_is_refused_naming_them(
    model_type: str, tmp_path: Path, tokenizer: Any
) -> None:
    from rsavq_core.models.streamed import StreamedModel

    source = save_tiny(model_type, tokenizer, tmp_path / model_type)
    # its files hold one matrix per expert, which transformers stacks on load: not streamable
    with pytest.raises(UnsupportedModelError, match="transformers converts .* load it whole"):
        StreamedModel(source, device=torch.device("cpu"))
    cfg = QuantConfig.for_method("rtn", bits=4, group_size=32)
    with pytest.raises(UnsupportedModelError, match=r"experts\.(gate_up_proj|down_proj).*allow-partial") as info:
        quantize_model(str(source), cfg)
    assert model_type in str(info.value)
    result = quantize_model(str(source), cfg, allow_partial=True)  # asked for: it goes on, and says
    kept = result.coverage["kept_float"]
    assert result.coverage["share"] < 0.9
    assert any("experts" in name for name in kept), kept
