"""Step 1 of a run: the model to quantize, its quantizable layers, and what an earlier run finished.

Fails fast, before any calibration: an unknown model id, a model with no linear layers, a config
the model's layers cannot take.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.formats.base import QuantizedLayer
from rsavq_core.methods.registry import get_method
from rsavq_core.models.layout import DecoderLayout, find_decoder_layout, linear_at
from rsavq_core.models.resolve import load_model, model_fingerprint, resolve_model
from rsavq_core.pipeline.resume import FinishedLayers

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

    def in_block(self, index: int) -> dict[str, str]:
        """Name in block ``index`` -> full name, for each of its linears."""
        return {name: full for i, name, full in self.names if i == index}


def load_source(model_id: str, cfg: QuantConfig) -> SourceModel:
    """Resolve (offline) and load ``model_id``, find its linears and check the config against them."""
    folder = resolve_model(model_id)  # fails fast, before the model is loaded
    model, tokenizer, _ = load_model(str(folder))
    layout = find_decoder_layout(model)  # fails fast on a model with no linear layers
    names = [(i, n, f"{layout.blocks_path}.{i}.{n}") for i in range(len(layout.blocks)) for n in layout.linear_names(i)]
    shapes = {}
    for i, n, full in names:
        linear = linear_at(layout.blocks[i], n)
        shapes[full] = (linear.out_features, linear.in_features)
    get_method(cfg.method).check_layers(cfg, shapes)  # before any calibration: a config the model cannot take
    return SourceModel(folder, model, tokenizer, layout, names)


def finished_layers(
    source: SourceModel, cfg: QuantConfig, checkpoint_dir: Path | None
) -> tuple[FinishedLayers | None, dict[str, Finished]]:
    """The run's layer checkpoint (None without ``checkpoint_dir``) and the layers it already holds."""
    if checkpoint_dir is None:
        return None, {}
    ckpt = FinishedLayers(checkpoint_dir, cfg, model_fingerprint(source.folder))
    resumed = {}
    for _, _, full in source.names:
        finished = ckpt.load(full)
        if finished is not None:
            resumed[full] = finished
    if resumed:
        log.info("resuming: %d of %d layers already checkpointed", len(resumed), len(source.names))
    return ckpt, resumed
