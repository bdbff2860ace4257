"""Block-wise fine-tuning: its two targets (the float block on the quantized inputs, or the float
model) and its normalisation weights (trained, stored, resumed)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from rsavq_core.calibration.sequential import BlockInputs
from rsavq_core.checkpoint.packed import OTHER_TENSORS_DTYPE
from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.finetune.blockwise import finetune_block
from rsavq_core.models.layout import find_decoder_layout
from rsavq_core.pipeline.blocks import quantize_layer
from rsavq_core.pipeline.quantize import quantize_model
from rsavq_core.runtime import load_quantized_model
from rsavq_core.settings import override


def _rtn_block(block: torch.nn.Module, names: list[str]) -> dict[str, Any]:
    cfg = QuantConfig.for_method("rtn", bits=2, group_size=16)
    return {n: quantize_layer(block.get_parameter(f"{n}.weight").detach(), None, None, cfg)[0] for n in names}


def test_the_float_walk_follows_the_float_model_while_the_quantized_one_drifts(tiny_llama: Any, one_thread: None):
    model, _ = tiny_llama
    tokens = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    layout = find_decoder_layout(model)
    walker = BlockInputs(model, tokens, micro_batch=1, track_float=True)
    block = layout.blocks[0]
    quantized = _rtn_block(block, layout.linear_names(0))
    walker.advance(block, quantized)
    with torch.no_grad():
        hidden = model(tokens, output_hidden_states=True).hidden_states[1]  # [2, T, D]: block 1's float input
    assert walker.float_inputs is not None
    assert torch.allclose(torch.cat(walker.float_inputs), hidden, atol=1e-5)
    drift = (torch.cat(walker.inputs) - hidden).norm() / hidden.norm()
    assert drift > 1e-2  # the quantized walk sees block 0's 2-bit error


def test_finetuning_to_the_float_model_targets_them_and_not_the_float_block(tiny_llama: Any, one_thread: None):
    """With the float model's outputs as targets, block 1 learns to undo block 0's error: its loss
    against those targets falls, and the result differs from training against the float block."""
    model, _ = tiny_llama
    tokens = torch.randint(0, 1000, (4, 12), generator=torch.Generator().manual_seed(1))
    layout = find_decoder_layout(model)
    walker = BlockInputs(model, tokens, micro_batch=1, track_float=True)
    walker.advance(layout.blocks[0], _rtn_block(layout.blocks[0], layout.linear_names(0)))
    block, names = layout.blocks[1], layout.linear_names(1)
    one_shot = _rtn_block(block, names)
    targets = walker.float_outputs(block)
    to_model, _, report = finetune_block(
        block, one_shot, walker.inputs, walker.block_kwargs, targets, steps=16, lr=1e-2
    )
    to_block, _, _ = finetune_block(block, one_shot, walker.inputs, walker.block_kwargs, steps=16, lr=1e-2)
    assert report["kept"] and report["loss_after"] < report["loss_before"], report
    name = names[0]
    assert not torch.equal(to_model[name].dequantize(), to_block[name].dequantize())


def test_tuned_norms_come_back_in_stored_precision_and_leave_the_block_alone(tiny_llama: Any, one_thread: None):
    model, _ = tiny_llama
    tokens = torch.randint(0, 1000, (4, 12), generator=torch.Generator().manual_seed(2))
    layout = find_decoder_layout(model)
    walker = BlockInputs(model, tokens, micro_batch=1)
    block, names = layout.blocks[0], layout.linear_names(0)
    before = {n: p.detach().clone() for n, p in block.named_parameters()}
    _, norms, report = finetune_block(
        block, _rtn_block(block, names), walker.inputs, walker.block_kwargs, steps=16, lr=1e-3, tune_norms=True
    )
    assert report["kept"], report
    assert set(norms) == {"input_layernorm.weight", "post_attention_layernorm.weight"}
    for name, value in norms.items():
        assert not torch.equal(value, before[name])  # trained
        assert torch.equal(value, value.to(OTHER_TENSORS_DTYPE).to(value.dtype))  # as the checkpoint stores it
    assert all(torch.equal(p, before[n]) for n, p in block.named_parameters())  # the float block is untouched


@pytest.fixture
def tiny_folder(tiny_llama: Any, tmp_path: Path) -> Path:
    model, tokenizer = tiny_llama
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_block_tuned_norms_are_saved_and_resumed(tiny_folder: Path, tmp_path: Path, one_thread: None):
    cfg = QuantConfig.for_method(
        "rtn",
        bits=2,
        calib_samples=4,
        calib_len=16,
        block_finetune_steps=8,
        block_finetune_lr=1e-2,
        block_finetune_norms=True,
    )
    norm = "model.layers.1.post_attention_layernorm.weight"
    with override(cache_dir=tmp_path / "cache"):
        first = quantize_model(str(tiny_folder), cfg, out_dir=tmp_path / "packed", checkpoint_dir=tmp_path / "work")
        tuned = first.model.get_parameter(norm).detach().clone()
        assert not torch.equal(tuned, torch.ones_like(tuned))  # the float model's norm is all ones
        loaded, _, _ = load_quantized_model(str(tmp_path / "packed"))
        assert torch.equal(loaded.get_parameter(norm).float(), tuned.float())

        def no_finetuning(stage: str, done: int, total: int, detail: Mapping[str, float] | None = None) -> None:
            assert not stage.startswith("fine-tune"), "a resumed run fine-tuned again"

        again = quantize_model(str(tiny_folder), cfg, checkpoint_dir=tmp_path / "work", progress=no_finetuning)
    assert torch.equal(again.model.get_parameter(norm), tuned)


def test_row_scales_and_outliers_are_trained_with_the_codebooks(tiny_llama: Any, one_thread: None):
    from rsavq_core.formats.vq_layer import VQLayer

    model, _ = tiny_llama
    tokens = torch.randint(0, 1000, (4, 12), generator=torch.Generator().manual_seed(3))
    layout = find_decoder_layout(model)
    walker = BlockInputs(model, tokens, micro_batch=1)
    block, names = layout.blocks[0], layout.linear_names(0)
    cfg = QuantConfig.for_method("kmeans", bits=2, kmeans_iters=2, row_scales=True, outliers=0.01)
    one_shot = {n: quantize_layer(block.get_parameter(f"{n}.weight").detach(), None, None, cfg)[0] for n in names}
    tuned, _, report = finetune_block(block, one_shot, walker.inputs, walker.block_kwargs, steps=16, lr=1e-4)
    assert report["kept"] and report["loss_after"] < report["loss_before"], report
    layer, before = tuned[names[0]], one_shot[names[0]]
    assert isinstance(layer, VQLayer) and isinstance(before, VQLayer)
    assert layer.row_scale is not None and before.row_scale is not None
    assert layer.row_scale.dtype == torch.float16
    assert not torch.equal(layer.row_scale, before.row_scale)  # trained, as the codebooks are
    assert torch.equal(layer.groups[0].indices, before.groups[0].indices)  # codes fixed
    assert layer.outliers is not None and before.outliers is not None
    assert torch.equal(layer.outliers.index, before.outliers.index)  # positions fixed, values trained
    assert layer.outliers.value.dtype == torch.float16 and not torch.equal(layer.outliers.value, before.outliers.value)
