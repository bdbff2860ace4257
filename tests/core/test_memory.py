"""The pre-flight memory estimate reads headers only, scales with the job, and fails with figures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.errors import InsufficientMemoryError, UnsupportedModelError
from rsavq_core.models.memory import GIB, block_linear_shapes, check_fits, estimate_job_memory


def fake_checkpoint(folder: Path, hidden: int, layers: int, vocab: int = 1000) -> Path:
    """A LLaMA config and headers-only-relevant safetensors (zeros) of its shapes, 4 heads, MLP 2x."""
    folder.mkdir()
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab,
    )
    config.save_pretrained(folder)
    tensors = {"model.embed_tokens.weight": torch.zeros(vocab, hidden, dtype=torch.float16)}
    for i in range(layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"model.layers.{i}.self_attn.{name}.weight"] = torch.zeros(hidden, hidden, dtype=torch.float16)
        for name, shape in (("gate_proj", (2 * hidden, hidden)), ("up_proj", (2 * hidden, hidden))):
            tensors[f"model.layers.{i}.mlp.{name}.weight"] = torch.zeros(shape, dtype=torch.float16)
        tensors[f"model.layers.{i}.mlp.down_proj.weight"] = torch.zeros(hidden, 2 * hidden, dtype=torch.float16)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_estimate_counts_parameters_and_scales_with_model_and_calibration(tmp_path: Path) -> None:
    small = fake_checkpoint(tmp_path / "s", hidden=64, layers=2)
    big = fake_checkpoint(tmp_path / "b", hidden=128, layers=4)
    cfg = QuantConfig.for_method("rsavq", bits=2)
    est = estimate_job_memory(small, cfg, streamed=False)
    h, i = 64, 128
    assert est.parameters == 1000 * h + 2 * (4 * h * h + 3 * i * h)
    assert est.terms["weights"] == 4 * est.parameters
    # statistics of the largest block, every linear the pipeline quantizes (found on the model's
    # skeleton, as the pipeline finds them): mean gradient M·N + F_O M² + F_I N² + Hessian N²
    linears = [(h, h)] * 4 + [(i, h)] * 2 + [(h, i)]
    assert est.terms["statistics"] == 2 * 4 * sum(m * n + m * m + 2 * n * n for m, n in linears)
    assert estimate_job_memory(big, cfg, streamed=False).total > est.total
    longer = estimate_job_memory(small, cfg.replace(calib_samples=256, calib_len=2048), streamed=False)
    assert longer.terms["activations"] == 32 * est.terms["activations"]  # 8x windows, 4x length
    rtn = estimate_job_memory(small, QuantConfig.for_method("rtn", bits=4), streamed=False)
    assert rtn.terms["statistics"] == rtn.terms["activations"] == rtn.terms["lm_head"] == 0


def test_the_blocks_are_the_pipelines_blocks_not_a_pattern_on_tensor_names(tmp_path: Path) -> None:
    """A tensor named like a block's (``<prefix>.<n>.``) outside the decoder blocks is not one."""
    folder = fake_checkpoint(tmp_path / "m", hidden=64, layers=2)
    cfg = QuantConfig.for_method("rsavq", bits=2)
    before = estimate_job_memory(folder, cfg)
    assert [len(block) for block in block_linear_shapes(folder)] == [7, 7]
    extra = {"vision.blocks.0.huge.weight": torch.zeros(1024, 1024, dtype=torch.float16)}
    save_file(extra, str(folder / "model-extra.safetensors"))
    after = estimate_job_memory(folder, cfg)
    assert after.parameters == before.parameters + 1024 * 1024  # stored, so loaded: counted
    assert after.terms["statistics"] == before.terms["statistics"]  # not a decoder block: no statistics


def test_check_fits_fails_with_the_figures(tmp_path: Path) -> None:
    est = estimate_job_memory(fake_checkpoint(tmp_path / "m", 64, 2), QuantConfig.for_method("rsavq", bits=2))
    check_fits(est, capacity_bytes=64 * GIB)
    with pytest.raises(InsufficientMemoryError, match=r"needs about .* GiB .*weights .* has 0\.50 GiB"):
        check_fits(est, capacity_bytes=0.5 * GIB)


def test_a_folder_without_safetensors_is_a_clear_error(tmp_path: Path) -> None:
    LlamaConfig(hidden_size=64, num_attention_heads=4).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="no safetensors"):
        estimate_job_memory(tmp_path, QuantConfig())


def test_a_streamed_estimate_holds_one_block_and_caps_activations_at_the_budget(tmp_path: Path) -> None:
    h, i, vocab = 64, 128, 1000
    shallow = fake_checkpoint(tmp_path / "shallow", hidden=h, layers=2, vocab=vocab)
    deep = fake_checkpoint(tmp_path / "deep", hidden=h, layers=16, vocab=vocab)
    cfg = QuantConfig.for_method("gptq", bits=4, calib_samples=8, calib_len=256)
    a, b = estimate_job_memory(shallow, cfg), estimate_job_memory(deep, cfg)
    block = 4 * h * h + 3 * i * h + 2 * h  # with its two norms (from the skeleton, not the files)
    assert a.phase == "statistics" and a.terms["block weights"] == 4 * block
    assert "resident weights" not in a.terms or a.terms["resident weights"] == 0  # Hessians need no head
    assert b.total == a.total  # Hessian-only statistics: two boundaries whatever the depth
    grads = QuantConfig.for_method("rsavq", bits=2, calib_samples=8, calib_len=256)
    boundary = 4 * 8 * 256 * h
    with_grads = estimate_job_memory(deep, grads)
    assert with_grads.terms["activations"] == 2 * boundary  # by default two; the rest waits on disk
    assert with_grads.terms["resident weights"] == 4 * vocab * h  # the head's pass: embedding (tied head)
    assert estimate_job_memory(shallow, grads).total == with_grads.total  # so depth costs no memory
    roomy = estimate_job_memory(deep, grads, activation_budget=100 * boundary)
    assert roomy.terms["activations"] == 17 * boundary  # a budget that holds every boundary
    capped = estimate_job_memory(deep, grads, activation_budget=3 * boundary)
    assert capped.terms["activations"] == 3 * boundary
    whole = estimate_job_memory(deep, grads, streamed=False)
    assert whole.terms["weights"] == 4 * whole.parameters and whole.total > capped.total


def test_a_gpu_estimate_splits_device_and_host_terms(tmp_path: Path) -> None:
    folder = fake_checkpoint(tmp_path / "m", hidden=64, layers=4)
    cfg = QuantConfig.for_method("rsavq", bits=2)
    est = estimate_job_memory(folder, cfg, device="cuda")
    assert {"statistics", "block weights", "resident weights", "lm_head"} <= set(est.device_terms)
    assert set(est.terms) == {"activations", "runtime", "headroom"}
    assert "on the device" in est.describe()
