"""Model id resolution (offline, fast, explanatory errors) and structural discovery of the linears."""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from rsavq_core.errors import ModelResolutionError, UnsupportedModelError
from rsavq_core.models.layout import describe_linears, find_decoder_layout, quantizable_linears
from rsavq_core.models.resolve import model_fingerprint, resolve_model
from tests.timing import patience

LLAMA_LINEARS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


@pytest.fixture
def offline_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An empty Hugging Face home, and no HF_HUB_OFFLINE: resolution must still never touch the network."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))


def test_local_folder_with_config(tmp_path: Path, tiny_llama: Any) -> None:
    model, tokenizer = tiny_llama
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert resolve_model(str(folder)) == folder
    assert resolve_model(str(folder) + "/") == folder


def test_local_folder_without_config(tmp_path: Path, offline_env: None) -> None:
    folder = tmp_path / "empty_model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelResolutionError) as info:
        resolve_model(str(folder))
    message = str(info.value)
    assert "cannot resolve" in message and "has no config.json" in message and str(folder) in message


@pytest.mark.parametrize("model_id", ["no-such-model-alias", "definitely-not-an-owner/no-such-model-xyz"])
def test_unresolvable_id_lists_what_was_tried_quickly(model_id: str, offline_env: None) -> None:
    started = time.perf_counter()
    with pytest.raises(ModelResolutionError) as info:
        resolve_model(model_id)
    assert time.perf_counter() - started < patience(5.0)
    message = str(info.value)
    assert f"cannot resolve model {model_id!r}" in message
    assert "does not exist" in message  # the local-directory attempt
    assert "built-in aliases (smollm2-135m)" in message
    if "/" in model_id:
        assert "Hugging Face cache" in message and "not cached" in message
    else:
        assert "not an 'owner/name' id" in message


@pytest.mark.parametrize("model_id", ["", "   "])
def test_empty_id(model_id: str) -> None:
    with pytest.raises(ModelResolutionError, match="empty model id"):
        resolve_model(model_id)


def test_decoder_layout_of_llama(tiny_llama: Any) -> None:
    model, _ = tiny_llama
    layout = find_decoder_layout(model)
    assert layout.blocks_path == "model.layers"
    assert layout.blocks is model.model.layers and len(layout.blocks) == 2
    assert layout.linear_names(0) == LLAMA_LINEARS


def test_quantizable_linears_of_llama(tiny_llama: Any) -> None:
    model, _ = tiny_llama
    linears = quantizable_linears(model)
    assert len(linears) == 14  # 7 per block; lm_head is not inside a decoder block
    names = [n for n, _ in linears]
    assert names == [f"model.layers.{i}.{n}" for i in range(2) for n in LLAMA_LINEARS]
    for name, mod in linears:
        assert model.get_submodule(name) is mod and isinstance(mod, nn.Linear)
    assert all("lm_head" not in n for n in names)
    shapes = {f"{m.out_features}x{m.in_features}" for _, m in linears}
    assert shapes == {"48x48", "24x48", "96x48", "48x96"}
    assert describe_linears(model) == '{"48x48": 4, "24x48": 4, "96x48": 4, "48x96": 2}'


class _Block(nn.Module):
    def __init__(self, with_linear: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.proj = nn.Linear(4, 4) if with_linear else nn.Identity()


def test_largest_list_of_linear_blocks_wins() -> None:
    model = nn.Module()
    model.small = nn.ModuleList([_Block(True)])
    model.blocks = nn.ModuleList([_Block(True) for _ in range(3)])
    model.no_linear = nn.ModuleList([_Block(False) for _ in range(5)])
    layout = find_decoder_layout(model)
    assert layout.blocks_path == "blocks"
    assert [n for n, _ in quantizable_linears(model)] == [f"blocks.{i}.proj" for i in range(3)]


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)),
        lambda: nn.Sequential(nn.Embedding(10, 4), nn.ModuleList([_Block(False), _Block(False)])),
        lambda: nn.Sequential(nn.Linear(4, 4)),  # a linear, but not inside a list of blocks
    ],
)
def test_model_without_linear_blocks_is_unsupported(make: Any) -> None:
    model = make()
    with pytest.raises(UnsupportedModelError, match="nn.Linear"):
        find_decoder_layout(model)
    with pytest.raises(UnsupportedModelError):
        quantizable_linears(model)


@pytest.fixture
def saved_tiny(tmp_path: Path, tiny_llama: Any) -> Path:
    model, _ = tiny_llama
    folder = tmp_path / "a"
    model.save_pretrained(folder)
    return folder


def test_fingerprint_is_stable_and_sees_the_config(saved_tiny: Path, tmp_path: Path) -> None:
    copy_dir = tmp_path / "copy"
    shutil.copytree(saved_tiny, copy_dir)
    assert model_fingerprint(copy_dir) == model_fingerprint(saved_tiny)  # content-based, not path-based
    config = json.loads((copy_dir / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    (copy_dir / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(copy_dir) != model_fingerprint(saved_tiny)


def test_fingerprint_sees_decoder_weights(saved_tiny: Path, tmp_path: Path, tiny_llama: Any) -> None:
    model, _ = tiny_llama
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight.mul_(2.0)  # e.g. another fine-tune of the same base
    changed.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "model.safetensors").stat().st_size == (saved_tiny / "model.safetensors").stat().st_size
    assert model_fingerprint(tmp_path / "b") != model_fingerprint(saved_tiny)
