"""Step 1 of a run: the model to quantize, its quantizable layers, and what an earlier run finished.

The model is loaded whole (CPU, float32) or streamed (``rsavq_core.models.streamed``: a skeleton
whose blocks are read in one at a time on the run's device), as the ``Placement`` says. Fails
fast, before any calibration: an unknown model id, a model with no linear layers, a checkpoint
that cannot be streamed when streaming was asked for, a config the model's layers cannot take.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.errors import ConfigError, UnsupportedModelError
from rsavq_core.formats.base import QuantizedLayer
from rsavq_core.methods.registry import get_method
from rsavq_core.models.coverage import Coverage, block_coverage, require_coverage
from rsavq_core.models.layout import DecoderLayout, find_decoder_layout, linear_at
from rsavq_core.models.resolve import load_model, load_tokenizer, model_fingerprint, resolve_model
from rsavq_core.models.streamed import StreamedModel
from rsavq_core.pipeline.placement import Placement
from rsavq_core.pipeline.resume import FinishedLayers, LazyFinished

log = logging.getLogger(__name__)

Finished = tuple[QuantizedLayer, dict[str, Any]]  # a packed layer and its report


@dataclass
class SourceModel:
    """The float model of a run and where its quantizable layers are."""

    folder: Path  # the resolved local checkpoint
    model: nn.Module
    tokenizer: object
    layout: DecoderLayout
    names: list[tuple[int, str, str]]  # (block index, name in the block, full name) of every linear
    streamed: StreamedModel | None = None  # None: ``model`` is whole, in host memory
    device: torch.device = torch.device("cpu")
    n_blocks: int = 0  # the blocks this run quantizes: all, or the first ones (a benchmark's limit)
    coverage: Coverage | None = None  # the share of the blocks' weights quantized; what stays in float

    def in_block(self, index: int) -> dict[str, str]:
        """Name in block ``index`` -> full name, for each of its linears."""
        return {name: full for i, name, full in self.names if i == index}

    @contextlib.contextmanager
    def open_block(self, index: int) -> Iterator[nn.Module]:
        """Block ``index`` with its float weights; a streamed block's linear weights are dropped on the
        way out (its norms stay: the packed checkpoint stores them)."""
        if self.streamed is None:
            yield self.layout.blocks[index]
            return
        with self.streamed.block(index, drop=list(self.in_block(index))) as block:
            yield block

    def release_linear(self, index: int, name: str) -> None:
        """Drop the float parameters of linear ``name`` of block ``index`` of a streamed model now,
        before the block's end (it has been quantized and will not run again)."""
        if self.streamed is None:
            return
        module = linear_at(self.layout.blocks[index], name)
        prefix = f"{self.streamed.block_prefix(index)}{name}."
        self.streamed.drop([prefix + key for key, p in module._parameters.items() if p is not None])


def load_source(
    model_id: str,
    cfg: QuantConfig,
    placement: Placement | None = None,
    *,
    blocks: int | None = None,
    allow_partial: bool = False,
) -> SourceModel:
    """Resolve (offline) and load ``model_id``, find its linears and check the config against them.
    ``blocks``: only the first ones are quantized (benchmarks). A model whose linears hold too little
    of its blocks' weights is refused unless ``allow_partial`` (``models.coverage``)."""
    placement = placement or Placement()
    folder = resolve_model(model_id)  # fails fast, before the model is loaded
    streamed = _streamed(folder, cfg, placement)
    if streamed is not None:
        model, tokenizer = streamed.model, load_tokenizer(folder)
    else:
        model, tokenizer, _ = load_model(str(folder))
    layout = find_decoder_layout(model)  # fails fast on a model with no linear layers
    n_blocks = len(layout.blocks) if blocks is None else min(blocks, len(layout.blocks))
    names = [(i, n, f"{layout.blocks_path}.{i}.{n}") for i in range(n_blocks) for n in layout.linear_names(i)]
    coverage = block_coverage(layout, [(i, n) for i, n, _ in names])
    require_coverage(coverage, _model_type(model), allow_partial=allow_partial)
    shapes = {}
    for i, n, full in names:
        linear = linear_at(layout.blocks[i], n)
        shapes[full] = (linear.out_features, linear.in_features)
    get_method(cfg.method).check_layers(cfg, shapes)  # before any calibration: a config the model cannot take
    return SourceModel(folder, model, tokenizer, layout, names, streamed, placement.device, n_blocks, coverage)


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", None) or type(model).__name__)


def _streamed(folder: Path, cfg: QuantConfig, placement: Placement) -> StreamedModel | None:
    """The streamed skeleton when the placement asks for streaming (or allows it and it works)."""
    wanted = placement.stream
    if cfg.model_finetune_steps:
        if wanted:
            raise ConfigError(
                "end-to-end fine-tuning (model_finetune_steps) trains the whole model at once and needs it in "
                "memory: run it without streaming (--stream off)"
            )
        if placement.device.type != "cpu":
            raise ConfigError(
                f"end-to-end fine-tuning runs on the CPU only (whole model); {placement.device} was asked"
            )
        return None
    if wanted is False:
        return None
    try:
        return StreamedModel(folder, device=placement.device)
    except UnsupportedModelError as exc:
        if wanted or placement.device.type != "cpu":
            raise
        log.info("loading the model whole: %s", exc)
        return None


def finished_layers(
    source: SourceModel, cfg: QuantConfig, checkpoint_dir: Path | None
) -> tuple[FinishedLayers | None, Mapping[str, Finished]]:
    """The run's layer checkpoint (None without ``checkpoint_dir``) and the layers it already holds."""
    if checkpoint_dir is None:
        return None, {}
    ckpt = FinishedLayers(checkpoint_dir, cfg, model_fingerprint(source.folder))
    resumed: dict[str, Finished] = {}
    found = []
    for _, _, full in source.names:
        finished = ckpt.load(full)  # validates the file (an unreadable one is discarded and redone)
        if finished is not None:
            found.append(full)
            if source.streamed is None:  # a streamed run reads them again when their block comes
                resumed[full] = finished
    if found:
        log.info("resuming: %d of %d layers already checkpointed", len(found), len(source.names))
    return ckpt, (resumed if source.streamed is None else LazyFinished(ckpt, found))
