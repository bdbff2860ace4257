"""transformers' own ``from_pretrained`` loads a packed checkpoint through our registered quantizer."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from rsavq_core.checkpoint.packed import QUANT_METHOD
from rsavq_core.runtime import QuantLinear, load_quantized_model
from tests.core.test_artifact import saved  # noqa: F401 - a fixture
from tests.timing import patience

ROOT = Path(__file__).resolve().parents[2]


def _from_pretrained(folder: Path, **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    import rsavq_core  # noqa: F401 - registers the quantization method

    return AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)


def test_from_pretrained_gives_our_quantized_model(saved: tuple[Path, dict[str, Any]], tiny_llama: Any) -> None:  # noqa: F811
    folder, layers = saved
    model = _from_pretrained(folder, dtype=torch.float32)  # load_quantized_model's default
    assert model.config.quantization_config.quant_method == QUANT_METHOD
    for name in layers:
        assert isinstance(model.get_submodule(name), QuantLinear), name
    assert not hasattr(model, "rsavq_shared")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as stored
    ours, tokenizer, _ = load_quantized_model(folder)
    ids = tokenizer("Both loaders give the same logits.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ours(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="serializ"):
        model.save_pretrained(folder.parent / "again")


def test_shared_codebooks_and_unstored_permutations_load_too(tmp_path: Path, tiny_llama: Any) -> None:
    from rsavq_core.config.quant_config import QuantConfig
    from rsavq_core.pipeline.quantize import quantize_model

    model, tokenizer = tiny_llama
    source = tmp_path / "tiny"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    cfg = QuantConfig.for_method(
        "kmeans", bits=2, calib_samples=2, calib_len=16, kmeans_iters=2, vector_len=4, n_pq=1, n_groups=1,
        share_codebooks=True,
    )  # fmt: skip
    result = quantize_model(str(source), cfg, out_dir=tmp_path / "q")
    assert result.out_dir is not None
    loaded = _from_pretrained(result.out_dir, dtype=torch.float32)
    ours, _, _ = load_quantized_model(result.out_dir)
    ids = tokenizer("Shared codebooks load through transformers.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ours(ids).logits, rtol=0, atol=0)


def test_the_readme_example_runs(saved: tuple[Path, dict[str, Any]]) -> None:  # noqa: F811
    """The README's five lines, run as a user would (a fresh interpreter), on a test artifact."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(import rsavq_core  # registers.*?)```", readme, flags=re.S)
    assert block is not None, "the transformers example is missing from the README"
    code = block.group(1)
    assert len([line for line in code.splitlines() if line.strip()]) == 5
    code = code.replace('"runs/artifact"', repr(str(saved[0])))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=patience(300), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("The capital of France is")


def test_without_rsavq_core_the_quantization_method_is_unknown(saved: tuple[Path, dict[str, Any]]) -> None:  # noqa: F811
    """config.json does not name our weights file: a transformers that lacks the quantizer fails
    loudly instead of loading a model with random linears."""
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(saved[0])!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=patience(300), cwd=ROOT)
    assert done.returncode != 0 and "model.safetensors" in done.stderr
