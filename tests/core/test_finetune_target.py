"""Block-wise fine-tuning's two targets: the float block on the quantized inputs, or the float model."""

from __future__ import annotations

from typing import Any

import torch

from rsavq_core.calibration.sequential import BlockInputs
from rsavq_core.config import QuantConfig
from rsavq_core.finetune import finetune_block
from rsavq_core.models import find_decoder_layout
from rsavq_core.pipeline import quantize_layer


def _rtn_block(block: torch.nn.Module, names: list[str]) -> dict[str, Any]:
    cfg = QuantConfig.for_method("rtn", bits=2, group_size=16)
    return {n: quantize_layer(block.get_submodule(n).weight.detach(), None, None, cfg)[0] for n in names}


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
    to_model, report = finetune_block(block, one_shot, walker.inputs, walker.block_kwargs, targets, steps=16, lr=1e-2)
    to_block, _ = finetune_block(block, one_shot, walker.inputs, walker.block_kwargs, steps=16, lr=1e-2)
    assert report["kept"] and report["loss_after"] < report["loss_before"], report
    name = names[0]
    assert not torch.equal(to_model[name].dequantize(), to_block[name].dequantize())
