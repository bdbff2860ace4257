"""Codebooks shared across the blocks of one layer type: fitted once, stored once, counted once."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rsavq_core.checkpoint.bitcount import model_bits
from rsavq_core.checkpoint.packed import WEIGHTS_FILE, read_checkpoint
from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.errors import ArtifactError, ConfigError
from rsavq_core.finetune.end_to_end import finetune_model
from rsavq_core.formats.vq_layer import VQLayer
from rsavq_core.pipeline.placement import Placement
from rsavq_core.pipeline.quantize import QuantizeResult, quantize_model, save_result
from rsavq_core.pipeline.resume import FinishedLayers
from tests.core.test_pipeline_cli import CALIB, check_artifact, workspace  # noqa: F401 - a fixture

# 4-dim vectors, one codebook of 2^8 entries at 2 bits: larger than any per-layer codebook here.
SHARED = dict(**CALIB, kmeans_iters=2, vector_len=4, n_pq=1, n_groups=1, share_codebooks=True)
ENTRIES, DIM = 256, 4

WHOLE = Placement(stream=False)  # these tests compare with the float model, which a streamed run never holds


@pytest.fixture(scope="module")
def shared_run(workspace: tuple[Path, Path]) -> QuantizeResult:  # noqa: F811 - the imported fixture
    root, folder = workspace
    cfg = QuantConfig.for_method("rsavq", bits=2, block_finetune_steps=2, **SHARED)
    return quantize_model(str(folder), cfg, out_dir=root / "q_shared", placement=WHOLE)


def _types(result: QuantizeResult) -> dict[str, list[VQLayer]]:
    by_type: dict[str, list[VQLayer]] = {}
    for name, layer in result.layers.items():
        assert isinstance(layer, VQLayer)
        by_type.setdefault(name.split(".", 3)[3], []).append(layer)
    return by_type


def test_every_block_uses_its_types_codebooks_even_after_fine_tuning(shared_run: QuantizeResult) -> None:
    by_type = _types(shared_run)
    assert len(by_type) == 7 and all(len(layers) == 2 for layers in by_type.values())
    for kind, layers in by_type.items():
        first = layers[0].groups[0]
        assert first.shared == f"{kind}.g0"
        assert tuple(first.codebooks.shape) == (1, ENTRIES, DIM)
        for layer in layers[1:]:
            assert layer.groups[0].shared == first.shared
            assert torch.equal(layer.groups[0].codebooks, first.codebooks), kind
        # each layer has its own codes and scales
        assert not torch.equal(layers[0].groups[0].indices, layers[1].groups[0].indices)
    assert "shared codebooks" in shared_run.timings
    finetuned = shared_run.reports["model.layers.0.mlp.up_proj"]["finetune"]
    assert finetuned["steps"] == 2  # block-wise fine-tuning ran (on row scales and norms only)


def test_shared_codebooks_are_stored_and_counted_once(shared_run: QuantizeResult, tiny_llama: Any) -> None:
    assert shared_run.out_dir is not None
    with safe_open(str(shared_run.out_dir / WEIGHTS_FILE), framework="pt") as fh:
        keys = list(fh.keys())
    shared = sorted(k for k in keys if k.startswith("rsavq_shared."))
    assert len(shared) == 7 and "rsavq_shared.self_attn.q_proj.g0.codebooks" in shared
    assert not [k for k in keys if k.endswith(".g0.codebooks") and not k.startswith("rsavq_shared.")]
    bits = model_bits(shared_run.layers, shared_run.model)["quantized"]
    assert bits["codebook_bits"] == 7 * ENTRIES * DIM * 16
    loaded = read_checkpoint(shared_run.out_dir)
    assert not [k for k in loaded.other_state if k.startswith("rsavq_shared.")]
    assert model_bits(loaded.layers, shared_run.model)["quantized"] == bits
    check_artifact(shared_run, tiny_llama[1])  # logits of the loaded artifact equal the reference


def test_a_missing_shared_tensor_is_a_clear_error(shared_run: QuantizeResult, tmp_path: Path) -> None:
    assert shared_run.out_dir is not None
    file = shared_run.out_dir / WEIGHTS_FILE
    with safe_open(str(file), framework="pt") as fh:
        meta = dict(fh.metadata())
    data = load_file(str(file))
    del data["rsavq_shared.mlp.down_proj.g0.codebooks"]
    save_file(data, str(tmp_path / WEIGHTS_FILE), metadata=meta)
    with pytest.raises(ArtifactError, match=r"down_proj: g0\.codebooks: shared tensor .* is missing"):
        read_checkpoint(tmp_path)


def test_a_shared_layer_resumes_from_its_checkpoint(shared_run: QuantizeResult, tmp_path: Path) -> None:
    name = "model.layers.1.self_attn.v_proj"
    ckpt = FinishedLayers(tmp_path, shared_run.config, "fp")
    ckpt.save(name, shared_run.layers[name], shared_run.reports[name])
    loaded = ckpt.load(name)
    assert loaded is not None and isinstance(loaded[0], VQLayer)
    group = loaded[0].groups[0]
    assert group.shared == "self_attn.v_proj.g0"
    assert torch.equal(loaded[0].dequantize(), shared_run.layers[name].dequantize())


@pytest.mark.parametrize(
    "knobs",
    [dict(allocation="proportional"), dict(budget="effective"), dict(bits=2.5), dict(calib_inputs="quantized")],
)
def test_shared_codebooks_need_one_codebook_size_per_type(knobs: dict[str, Any]) -> None:
    settings = {**SHARED, "bits": 2, **knobs}
    with pytest.raises(ConfigError, match="share_codebooks (needs|fits on the float)"):
        QuantConfig.for_method("rsavq", **settings)


def test_a_resumed_run_goes_on_with_the_codebooks_it_started_with(
    workspace: tuple[Path, Path],  # noqa: F811 - the imported fixture
    tmp_path: Path,
) -> None:
    _, folder = workspace
    cfg = QuantConfig.for_method("rsavq", bits=2, block_finetune_steps=0, **SHARED)
    quantize_model(str(folder), cfg, checkpoint_dir=tmp_path)
    # As if block 1's q_proj had not finished, and block 0's had been fitted to other codebooks
    # (statistics recomputed elsewhere differ in their last bits): the resumed run must use those.
    done, todo = tmp_path / "model.layers.0.self_attn.q_proj.safetensors", "model.layers.1.self_attn.q_proj"
    (tmp_path / f"{todo}.safetensors").unlink()
    with safe_open(str(done), framework="pt") as fh:
        meta = dict(fh.metadata())
    data = load_file(str(done))
    key = "rsavq_shared.self_attn.q_proj.g0.codebooks"
    data[key] = (data[key].float() + 0.5).half()
    save_file(data, str(done), metadata=meta)
    resumed = quantize_model(str(folder), cfg, checkpoint_dir=tmp_path)
    layer = resumed.layers[todo]
    assert isinstance(layer, VQLayer)
    assert torch.equal(layer.groups[0].codebooks, data[key])


def test_end_to_end_fine_tuning_trains_shared_codebooks_once_for_every_layer(
    shared_run: QuantizeResult, tiny_llama: Any, tmp_path: Path
) -> None:
    # Block-wise fine-tuning cannot train codebooks that other blocks use; end-to-end fine-tuning
    # sees every layer, so it trains each shared codebook as one parameter: after it, the layers
    # of a type still hold identical codebooks (other than before), and the artifact stores them once.
    model, _ = tiny_llama
    tokens = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a parameter handed to the optimizer twice
        tuned, norms, report = finetune_model(model, dict(shared_run.layers), tokens, steps=8, lr=1e-3, micro_batch=2)
    assert report["kept"] and report["kl_after"] < report["kl_before"], report
    # the norms are the model's own (a layer's row scales are the layer's, not a norm)
    assert norms and set(norms) <= {name for name, p in model.named_parameters() if p.dim() == 1}
    before, after = _types(shared_run), _types(dataclasses.replace(shared_run, layers=tuned))
    for kind, layers in after.items():
        first = layers[0].groups[0]
        assert first.shared == f"{kind}.g0" and first.codebooks.dtype == torch.float16
        assert not torch.equal(first.codebooks, before[kind][0].groups[0].codebooks), kind
        assert all(torch.equal(layer.groups[0].codebooks, first.codebooks) for layer in layers[1:]), kind
        assert all(torch.equal(a.groups[0].indices, b.groups[0].indices) for a, b in zip(layers, before[kind]))
    saved = save_result(dataclasses.replace(shared_run, layers=tuned), tmp_path)
    loaded = read_checkpoint(saved)
    assert all(torch.equal(loaded.layers[n].dequantize(), tuned[n].dequantize()) for n in tuned)
