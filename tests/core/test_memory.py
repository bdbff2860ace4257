"""The pre-flight memory estimate reads headers only, scales with the job, and fails with figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.errors import InsufficientMemoryError, UnsupportedModelError
from rsavq_core.models.memory import GIB, check_fits, estimate_job_memory


def fake_checkpoint(folder: Path, hidden: int, layers: int, vocab: int = 1000) -> Path:
    folder.mkdir()
    tensors = {"model.embed_tokens.weight": torch.zeros(vocab, hidden, dtype=torch.float16)}
    for i in range(layers):
        tensors[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.zeros(hidden, hidden, dtype=torch.float16)
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = torch.zeros(2 * hidden, hidden, dtype=torch.float16)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"hidden_size": hidden, "vocab_size": vocab}))
    return folder


def test_estimate_counts_parameters_and_scales_with_model_and_calibration(tmp_path: Path) -> None:
    small = fake_checkpoint(tmp_path / "s", hidden=64, layers=2)
    big = fake_checkpoint(tmp_path / "b", hidden=128, layers=4)
    cfg = QuantConfig.for_method("rsavq", bits=2)
    est = estimate_job_memory(small, cfg)
    assert est.parameters == 1000 * 64 + 2 * (64 * 64 + 128 * 64)
    assert est.terms["weights"] == 4 * est.parameters
    # statistics of the largest block: q (64x64) and up (128x64): grad + F_O + F_I + H
    assert est.terms["statistics"] == 2 * 4 * ((64 * 64 + 64 * 64 + 2 * 64 * 64) + (128 * 64 + 128 * 128 + 2 * 64 * 64))
    assert estimate_job_memory(big, cfg).total > est.total
    longer = estimate_job_memory(small, cfg.replace(calib_samples=256, calib_len=2048))
    assert longer.terms["activations"] == 32 * est.terms["activations"]  # 8x windows, 4x length
    rtn = estimate_job_memory(small, QuantConfig.for_method("rtn", bits=4))
    assert rtn.terms["statistics"] == rtn.terms["activations"] == rtn.terms["lm_head"] == 0


def test_check_fits_fails_with_the_figures(tmp_path: Path) -> None:
    est = estimate_job_memory(fake_checkpoint(tmp_path / "m", 64, 2), QuantConfig.for_method("rsavq", bits=2))
    check_fits(est, capacity_bytes=64 * GIB)
    with pytest.raises(InsufficientMemoryError, match=r"needs about .* GiB .*weights .* has 0\.50 GiB"):
        check_fits(est, capacity_bytes=0.5 * GIB)


def test_a_folder_without_safetensors_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UnsupportedModelError, match="no safetensors"):
        estimate_job_memory(tmp_path, QuantConfig())
