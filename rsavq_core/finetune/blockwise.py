"""Block-wise fine-tuning: codes fixed, each layer's continuous parameters (VQ codebooks, scalar
scales) trained so that the quantized block reproduces the float block's outputs (AQLM, VPTQ).

The inputs are what the block receives in the partly quantized model (``BlockInputs``), the targets
the float block's outputs on those inputs, the loss the mean squared error relative to the
targets' energy. Adam over micro-batches in a fixed order: deterministic for a given input. The
trained values are rounded to their stored precision before the final loss is measured, and a
block whose loss did not improve keeps its one-shot layers.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from rsavq_core.calibration.block_io import first_tensor
from rsavq_core.calibration.sequential import BlockInputs
from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.finetune.loop import adam_steps
from rsavq_core.finetune.tunable import TunedLinear, norm_parameters, round_norms, round_tuned
from rsavq_core.formats.base import QuantizedLayer
from rsavq_core.formats.registry import format_of
from rsavq_core.models.layout import replace_module
from rsavq_core.progress import Progress

MEASURE_BATCHES = 8


def finetune_block(
    block: nn.Module,
    layers: dict[str, QuantizedLayer],  # by name relative to the block
    inputs: list[torch.Tensor],  # per micro-batch [B, T, D]: what the block receives
    kwargs: list[dict[str, object]],  # the block's keyword arguments per micro-batch
    targets: list[torch.Tensor] | None = None,  # per micro-batch [B, T, D]; None: the float block on ``inputs``
    *,
    steps: int,
    lr: float,
    tune_norms: bool = False,
    progress: Progress | None = None,
    stage: str = "fine-tune",
) -> tuple[dict[str, QuantizedLayer], dict[str, torch.Tensor], dict[str, Any]]:
    """The block's layers after ``steps`` Adam steps, its tuned normalisation weights (relative name
    -> tensor; empty unless ``tune_norms``) and a report (losses before and after). When the loss
    did not fall, the input layers and no norms come back."""
    if targets is None:
        with torch.no_grad():
            targets = [first_tensor(block(x, **kw)).detach() for x, kw in zip(inputs, kwargs, strict=True)]
    tuned = copy.deepcopy(block)
    for p in tuned.parameters():
        p.requires_grad_(False)
    norms = norm_parameters(tuned, set(layers)) if tune_norms else {}
    for p in norms.values():
        p.requires_grad_(True)
    modules: dict[str, TunedLinear] = {}
    for name, layer in layers.items():
        layer_format = format_of(layer)
        tunable = layer_format.tunable(layer)
        if tunable:
            modules[name] = TunedLinear(layer_format, layer, tunable)
            replace_module(tuned, name, modules[name])
    if not (modules or norms) or steps == 0:
        return layers, {}, {}

    def loss_of(b: int) -> torch.Tensor:
        out = first_tensor(tuned(inputs[b], **kwargs[b]))
        return (out - targets[b]).pow(2).mean() / targets[b].pow(2).mean().clamp_min(1e-30)

    # Before / after are measured on an even spread of at most MEASURE_BATCHES micro-batches: on
    # all of them the two measurements cost as many forward passes as the training's 64 steps.
    spread = min(MEASURE_BATCHES, len(inputs))
    measured = [i * len(inputs) // spread for i in range(spread)]

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(float(loss_of(b)) for b in measured) / len(measured)

    before = mean_loss()
    trained = [p for m in modules.values() for p in m.parameters()] + list(norms.values())
    optimizer = torch.optim.Adam(trained, lr=lr)
    adam_steps(optimizer, lambda step: loss_of(step % len(inputs)), steps=steps, progress=progress, stage=stage)
    out = {**layers, **round_tuned(modules)}
    round_norms(norms)
    after = mean_loss()
    report = {"loss_before": before, "loss_after": after, "steps": steps, "kept": after < before}
    if after >= before:
        return layers, {}, report
    return out, {name: p.detach().clone() for name, p in norms.items()}, report


def finetune_quantized_block(
    block: nn.Module,
    quantized: dict[str, tuple[QuantizedLayer, dict[str, Any]]],
    walker: BlockInputs,
    cfg: QuantConfig,
    progress: Progress | None,
    stage: str,
) -> tuple[dict[str, tuple[QuantizedLayer, dict[str, Any]]], dict[str, torch.Tensor]]:
    """Block-wise fine-tuning of every layer of the block; each layer's report gets the block's
    losses. Also returns the block's tuned normalisation weights (relative names; may be empty)."""
    tuned, norms, report = finetune_block(
        block,
        {name: layer for name, (layer, _) in quantized.items()},
        walker.inputs,
        walker.block_kwargs,
        walker.float_outputs(block) if cfg.finetune_target == "model" else None,
        steps=cfg.block_finetune_steps or 0,
        lr=cfg.block_finetune_lr,
        tune_norms=cfg.block_finetune_norms,
        progress=progress,
        stage=stage,
    )
    return {name: (tuned[name], {**rep, "finetune": report}) for name, (_, rep) in quantized.items()}, norms
