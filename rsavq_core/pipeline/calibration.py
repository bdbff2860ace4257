"""Step 2 of a run: the calibration windows and what is computed from them before the block loop.

Three things, each only when the run needs it: the token windows (``calibration_tokens``), the
float model's statistics (``calibration_store``: from the cache when they were computed before),
and the walker that carries each block's inputs through the partly quantized model (sequential
Hessians, block-wise fine-tuning).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rsavq_core.calibration.cache import StatsKey, StatsStore, compute_statistics
from rsavq_core.calibration.sequential import BlockInputs
from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.data.text_files import TextSource
from rsavq_core.data.windows import calibration_windows, tokens_hash
from rsavq_core.models.resolve import model_fingerprint
from rsavq_core.progress import Progress


@dataclass
class Calibration:
    """What the block loop and end-to-end fine-tuning read; each part None when the run needs none."""

    tokens: torch.Tensor | None = None  # [calib_samples, calib_len] int64
    store: StatsStore | None = None  # the float model's per-block statistics
    cached: bool = False  # the statistics came from the cache
    walker: BlockInputs | None = None  # each block's inputs in the partly quantized model
    timings: dict[str, float] = field(default_factory=dict)


def calibration_tokens(tokenizer: object, cfg: QuantConfig, source: TextSource | None = None) -> torch.Tensor:
    """[calib_samples, calib_len] int64: the run's calibration windows (from ``source`` when given)."""
    return calibration_windows(
        tokenizer, cfg.calib_samples, cfg.calib_len, sampling=cfg.calib_sampling, seed=cfg.seed, source=source
    )


def calibration_store(
    model: nn.Module,
    tokens: torch.Tensor,  # [S, T] int64, ``calibration_tokens``
    folder: Path,
    cfg: QuantConfig,
    *,
    micro_batch: int = 4,
    progress: Progress | None = None,
) -> tuple[StatsStore, bool]:
    """The statistics the config needs, from the cache when possible. Returns (store, was_cached)."""
    key = StatsKey(
        fingerprint=model_fingerprint(folder),
        tokens_hash=tokens_hash(tokens),
        n_samples=cfg.calib_samples,
        seq_len=cfg.calib_len,
        fisher=cfg.fisher,
        with_grads=cfg.needs_gradients(),
    )
    store = StatsStore.find(key)
    if store is not None:
        return store, True
    return compute_statistics(model, tokens, key, micro_batch=micro_batch, progress=progress), False


def sequential_statistics(cfg: QuantConfig) -> bool:
    """Whether each block's Hessians come from the partly quantized model (``calib_inputs="quantized"``)."""
    return cfg.calib_inputs == "quantized" and cfg.needs_hessian()


def prepare_calibration(
    model: nn.Module,
    tokenizer: object,
    folder: Path,
    cfg: QuantConfig,
    *,
    layers_to_do: bool,  # False: every layer was finished by an earlier run
    text: TextSource | None,
    micro_batch: int,
    progress: Progress | None,
) -> Calibration:
    """The windows, statistics and walker this run needs (nothing for what it does not need)."""
    block_steps = cfg.block_finetune_steps or 0  # resolved to the method's default on construction
    need_tokens = (layers_to_do and (cfg.needs_calibration() or block_steps)) or cfg.model_finetune_steps
    if not need_tokens:
        return Calibration()
    tokens = calibration_tokens(tokenizer, cfg, text)
    out = Calibration(tokens=tokens)
    if not layers_to_do:
        return out
    sequential = sequential_statistics(cfg)
    if cfg.needs_gradients() or (cfg.needs_hessian() and not sequential):
        t0 = time.perf_counter()
        out.store, out.cached = calibration_store(
            model, tokens, folder, cfg, micro_batch=micro_batch, progress=progress
        )
        out.timings["statistics"] = time.perf_counter() - t0
    if sequential or block_steps:
        # Block-wise fine-tuning steps take the walker's micro-batches as they are.
        walk_batch = cfg.finetune_batch if block_steps else micro_batch
        track_float = bool(block_steps) and cfg.finetune_target == "model"
        out.walker = BlockInputs(model, tokens, micro_batch=walk_batch, track_float=track_float, progress=progress)
    return out
