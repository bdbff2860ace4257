"""``embedding_bits``: the input embedding and an untied head quantized, stored, loaded and counted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from rsavq_core.algorithms.scalar import rtn_quantize
from rsavq_core.checkpoint.bitcount import model_bits
from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.errors import ConfigError
from rsavq_core.pipeline.quantize import quantize_model
from rsavq_core.runtime import QuantLinear, load_quantized_model
from rsavq_core.runtime.qembedding import QuantEmbedding
from tests.architectures import save_tiny

GPTQ: dict[str, Any] = {"group_size": 32, "calib_samples": 4, "calib_len": 32}


@pytest.fixture(scope="module")
def tokenizer(smol_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smol_dir))


@pytest.mark.parametrize("dim,bits", [(64, 4), (48, 3)])  # rows of whole words, and rows that straddle them
def test_a_lookup_dequantizes_the_rows_asked_for(dim: int, bits: int) -> None:
    torch.manual_seed(0)
    table = nn.Embedding(100, dim, padding_idx=0)
    layer = rtn_quantize(table.weight, bits, 16)
    ids = torch.tensor([[5, 99, 0, 5], [1, 2, 3, 4]])
    module = QuantEmbedding(layer, table)
    expected = F.embedding(ids, layer.dequantize())
    assert torch.equal(module(ids), expected)
    assert module.padding_idx == 0 and module.half()(ids).dtype == torch.float16


def test_a_head_quantized_against_its_inputs_hessian_errs_less_on_them(tokenizer: Any) -> None:
    """GPTQ on the head's input Hessian against round to nearest: less error where the final hidden
    states actually lie (tr(ΔW H ΔWᵀ)), on a tied model, whose embedding is that same layer."""
    from rsavq_core.algorithms.linalg import hessian_relative_error
    from rsavq_core.pipeline.embeddings import head_input_hessian, quantize_embeddings
    from tests.architectures import build_tiny

    model = build_tiny("gemma3_text", tokenizer)
    head = model.get_output_embeddings()
    tokens = torch.randint(0, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    hessian = head_input_hessian(model, head, tokens, micro_batch=2)
    assert hessian.shape == (head.in_features, head.in_features) and torch.allclose(hessian, hessian.T)
    plain = quantize_embeddings(model, 3)
    aware = quantize_embeddings(model, 3, head_hessian=hessian)
    assert aware["lm_head"] is aware["model.embed_tokens"]  # tied: one layer
    errors = [hessian_relative_error(head.weight, q["lm_head"].dequantize(), hessian) for q in (plain, aware)]
    assert errors[1] < 0.8 * errors[0], errors


def _quantize(tmp: Path, tokenizer: Any, model_type: str, embedding_bits: int | None) -> Any:
    source = tmp / model_type
    if not source.exists():
        save_tiny(model_type, tokenizer, source)
    cfg = QuantConfig.for_method("gptq", bits=4, embedding_bits=embedding_bits, **GPTQ)
    out = tmp / f"q{embedding_bits}"
    return quantize_model(str(source), cfg, out_dir=out), out


@pytest.mark.parametrize("model_type", ["qwen3", "gemma3_text"])  # an untied head; a tied head and scaled lookups
def test_embeddings_are_quantized_stored_once_and_loaded_both_ways(
    model_type: str, tmp_path: Path, tokenizer: Any
) -> None:
    from transformers import AutoModelForCausalLM

    import rsavq_core  # noqa: F401 - registers the quantization method with transformers

    off, off_dir = _quantize(tmp_path, tokenizer, model_type, None)
    on, on_dir = _quantize(tmp_path, tokenizer, model_type, 4)
    tied = on.model.config.tie_word_embeddings
    embedding, head = on.layers["model.embed_tokens"], on.layers["lm_head"]
    assert (embedding is head) == tied
    assert {k: v for k, v in on.layers.items() if "layers" in k}.keys() == off.layers.keys()
    with safe_open(str(on_dir / "rsavq.safetensors"), framework="pt") as fh:
        manifest = json.loads(fh.metadata()["layers"])
        names = set(fh.keys())
    assert (manifest["lm_head"] == {"same_as": "model.embed_tokens"}) == tied
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names
    bits_on, bits_off = model_bits(on.layers, on.model), model_bits(off.layers, off.model)
    assert bits_on["n_params"] == bits_off["n_params"]  # the same parameters, a tied matrix once
    assert bits_on["all_bpw"] < 0.6 * bits_off["all_bpw"]  # the embedding was most of the file
    assert (on_dir / "rsavq.safetensors").stat().st_size < 0.6 * (off_dir / "rsavq.safetensors").stat().st_size

    ours: Any = load_quantized_model(on_dir)[0]
    theirs = AutoModelForCausalLM.from_pretrained(str(on_dir), dtype=torch.float32).eval()
    for model in (ours, theirs):
        assert isinstance(model.get_input_embeddings(), QuantEmbedding)
        assert isinstance(model.get_output_embeddings(), QuantLinear)
    reference = AutoModelForCausalLM.from_pretrained(str(off_dir), dtype=torch.float32).eval()
    with torch.no_grad():  # the float model with the dequantized tables: the same logits
        reference.get_input_embeddings().weight = nn.Parameter(embedding.dequantize())
        reference.get_output_embeddings().weight = nn.Parameter(head.dequantize())
    ids = tokenizer("Every stored bit counts.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = ours(ids).logits
        torch.testing.assert_close(theirs(ids).logits, logits, rtol=0, atol=0)
        torch.testing.assert_close(reference(ids).logits, logits, rtol=1e-5, atol=1e-5)


def test_a_streamed_run_gives_the_whole_runs_bytes_with_embeddings(tmp_path: Path, tokenizer: Any) -> None:
    from tests.core.test_streaming import quantize_both, sha256

    source = save_tiny("llama", tokenizer, tmp_path / "llama")
    quantize_both(source, QuantConfig.for_method("gptq", bits=4, embedding_bits=3, **GPTQ), tmp_path)
    assert sha256(tmp_path / "stream") == sha256(tmp_path / "whole")


def test_embedding_bits_are_checked_and_left_out_of_configs_that_do_not_use_them() -> None:
    assert "embedding_bits" not in QuantConfig.for_method("gptq", bits=4).to_dict()  # old artifacts' bytes
    cfg = QuantConfig.for_method("gptq", bits=4, embedding_bits=3)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    for bad in (1, 9):
        with pytest.raises(ConfigError, match="embedding_bits"):
            QuantConfig.for_method("gptq", bits=4, embedding_bits=bad)
