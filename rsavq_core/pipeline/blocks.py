"""Steps 3 and 4 of a run: what the layers of one type share across blocks, then the block loop.

The block loop quantizes block after block from the float model's statistics (VPTQ-style, spec
§11.3) or, with sequential statistics, from Hessians of each block's inputs in the partly
quantized model; block-wise fine-tuning follows each block; every finished layer is checkpointed
so a killed run resumes from its last finished layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from rsavq_core.calibration.sequential import with_hessians
from rsavq_core.calibration.statistics import LayerStats
from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.finetune.blockwise import finetune_quantized_block
from rsavq_core.formats.base import QuantizedLayer
from rsavq_core.methods.registry import get_method
from rsavq_core.models.layout import linear_at
from rsavq_core.pipeline.calibration import Calibration, sequential_statistics
from rsavq_core.pipeline.resume import FinishedLayers
from rsavq_core.pipeline.source import Finished, SourceModel
from rsavq_core.progress import Progress

LayerCallback = Callable[[str, dict[str, Any]], None]  # (full layer name, report)


def quantize_layer(
    weight: torch.Tensor,  # [M, N] floating
    bias: torch.Tensor | None,  # [M] floating
    stats: LayerStats | None,
    cfg: QuantConfig,
    shared: Any = None,  # what the method's shared fit gave this layer's type, or None
) -> Finished:
    """One linear layer by the config's method (``rsavq_core.methods``): the packed layer and its report."""
    method = get_method(cfg.method)
    if shared is None:  # methods written before shared fits take four arguments
        return method.quantize_layer(weight, bias, stats, cfg)
    return method.quantize_layer(weight, bias, stats, cfg, shared)


def fit_shared(
    source: SourceModel,
    calib: Calibration,
    cfg: QuantConfig,
    progress: Progress | None,
    resumed: Mapping[str, Finished],  # full name -> a layer an earlier run finished
) -> dict[str, Any]:
    """What the method shares between the blocks' layers of one type (name in the block -> it), fitted
    on every block's layer and its float statistics before the per-block pass; {} when nothing."""
    n_blocks = source.n_blocks
    fit = get_method(cfg.method).shared_fit(cfg, n_blocks)
    if fit is None:
        return {}
    for index in range(n_blocks):
        stats = block_stats(calib, index, source.device)
        with source.open_block(index) as block:
            for name in source.in_block(index):
                fit.add(name, linear_at(block, name).weight.detach(), stats.get(name))
        if progress:
            progress("shared codebooks: sample", index + 1, n_blocks)
    finished = {name: resumed[full][0] for _, name, full in source.names if full in resumed}
    return fit.fit(finished, progress)


def block_stats(calib: Calibration, index: int, device: torch.device) -> dict[str, LayerStats]:
    """The float model's statistics of block ``index`` (by name in the block) on ``device``; {} without a store."""
    if calib.store is None:
        return {}
    stats = calib.store.load_block(index)
    return stats if device.type == "cpu" else {name: tensors_to(st, device) for name, st in stats.items()}


T = TypeVar("T")


def tensors_to(value: T, device: torch.device | str) -> T:
    """A dataclass ``value`` (statistics, a packed layer) with its tensor fields on ``device``;
    anything else as it is."""
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return value
    fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    moved = {k: v.to(device) for k, v in fields.items() if isinstance(v, torch.Tensor)}
    return dataclasses.replace(value, **moved) if moved else value


@dataclass
class BlockLoop:
    """One run's pass over the decoder blocks, and what it produced."""

    source: SourceModel
    cfg: QuantConfig
    calib: Calibration
    shared: dict[str, Any]
    checkpoint: FinishedLayers | None
    resumed: Mapping[str, Finished]
    progress: Progress | None = None
    on_layer: LayerCallback | None = None
    layers: dict[str, QuantizedLayer] = field(default_factory=dict)  # full name -> packed layer
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    norms: dict[str, torch.Tensor] = field(default_factory=dict)  # full name -> norm weight tuned block-wise

    def run(self) -> None:
        n_blocks = self.source.n_blocks
        walker = self.calib.walker
        for index in range(n_blocks):
            in_block = self.source.in_block(index)
            if walker is None and all(full in self.resumed for full in in_block.values()):
                if self.source.streamed is not None:  # its norms only: the checkpoint stores them
                    self.source.streamed.load_block_state(index, skip=list(in_block))
                self._publish(index, *self._resumed(index))
                continue
            with self.source.open_block(index) as block:
                done, block_norms = self._block(index, block)
                self._publish(index, done, block_norms)
                if walker is None or index + 1 == n_blocks:
                    continue
                if self.calib.float_walk:
                    if walker.index == index:  # not advanced by _block (every layer was resumed)
                        walker.advance_unchanged(block)
                else:
                    walker.advance(block, {name: done[name][0] for name in in_block}, block_norms)

    def _resumed(self, index: int) -> tuple[dict[str, Finished], dict[str, torch.Tensor]]:
        """What an earlier run finished of block ``index``: its layers and its tuned norms."""
        in_block = self.source.in_block(index)
        done = {name: self.resumed[full] for name, full in in_block.items() if full in self.resumed}
        return done, self.checkpoint.load_norms(index) if self.checkpoint is not None else {}

    def _block(self, index: int, block: nn.Module) -> tuple[dict[str, Finished], dict[str, torch.Tensor]]:
        """Every layer of block ``index`` (resumed or quantized now) and its block-wise tuned norms."""
        in_block = self.source.in_block(index)
        done, block_norms = self._resumed(index)
        if len(done) == len(in_block):
            return done, block_norms
        walker = self.calib.walker
        fresh = self._quantize_layers(index, block, [n for n in in_block if n not in done])
        if self.cfg.block_finetune_steps and walker is not None:
            fresh, block_norms = finetune_quantized_block(
                block, {**done, **fresh}, walker, self.cfg, self.progress, f"fine-tune block {index}"
            )
            if self.checkpoint is not None:
                self.checkpoint.save_norms(index, block_norms)
        if self.source.device.type != "cpu":
            fresh = {name: (tensors_to(layer, "cpu"), report) for name, (layer, report) in fresh.items()}
        for name, (layer, report) in fresh.items():
            if self.checkpoint is not None:
                self.checkpoint.save(in_block[name], layer, report)
        done.update(fresh)
        return done, block_norms

    def _quantize_layers(self, index: int, block: nn.Module, names: list[str]) -> dict[str, Finished]:
        """Quantize the linears ``names`` of block ``index`` from their statistics."""
        stats = block_stats(self.calib, index, self.source.device)
        walker = self.calib.walker
        if (sequential_statistics(self.cfg) or self.calib.float_walk) and walker is not None:
            stats = {name: with_hessians(stats.get(name), fresh) for name, fresh in walker.hessians(block).items()}
        if self.calib.float_walk and walker is not None and index + 1 < self.source.n_blocks:
            walker.advance_unchanged(block)  # the float block's outputs now, so its linears can go one by one
        # A streamed block's float linears, and each layer's statistics, are released as soon as the
        # layer is quantized when nothing runs the block again (a walker through quantized blocks,
        # block-wise fine-tuning): an 8B block's 0.6 GB of other linears and 0.9 GB of their
        # statistics are not alive beside its down projection's factorization.
        release = self.source.streamed is not None and not self.cfg.block_finetune_steps
        release = release and (walker is None or self.calib.float_walk)
        fresh = {}
        for name in names:
            module = linear_at(block, name)
            layer_stats = stats.pop(name, None)
            fresh[name] = quantize_layer(
                module.weight.detach(), module.bias, layer_stats, self.cfg, self.shared.get(name)
            )
            del layer_stats
            if release:
                self.source.release_linear(index, name)
        return fresh

    def _publish(self, index: int, done: dict[str, Finished], block_norms: dict[str, torch.Tensor]) -> None:
        for name, full in self.source.in_block(index).items():
            layer, self.reports[full] = done[name]
            if self.source.streamed is None:  # a streamed run's layers stay in their checkpoint files
                self.layers[full] = layer
            if self.on_layer:
                self.on_layer(full, self.reports[full])
            if self.progress:
                self.progress("quantize", len(self.reports), len(self.source.names))
        prefix = f"{self.source.layout.blocks_path}.{index}."
        self.norms.update({prefix + name: value for name, value in block_norms.items()})
