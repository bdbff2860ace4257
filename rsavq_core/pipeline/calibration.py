"""Step 2 of a run: the calibration windows and what is computed from them before the block loop.

Three things, each only when the run needs it: the token windows (``calibration_tokens``), the
float model's statistics (``calibration_store``: from the cache when they were computed before),
and the walker that carries each block's inputs through the partly quantized model (sequential
Hessians, block-wise fine-tuning).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rsavq_core.calibration.activations import ActivationStore, check_offload_dir, default_offload_root
from rsavq_core.calibration.cache import StatsKey, StatsStore, compute_statistics
from rsavq_core.calibration.sequential import BlockInputs
from rsavq_core.calibration.streamed import record_boundary, streamed_statistics
from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.data.text_files import TextSource
from rsavq_core.data.windows import calibration_windows, tokens_hash
from rsavq_core.errors import ConfigError
from rsavq_core.methods.registry import get_method
from rsavq_core.models.files import cache_root
from rsavq_core.models.layout import linear_at
from rsavq_core.models.memory import GIB, boundary_budget, statistics_store_bytes
from rsavq_core.models.resolve import model_fingerprint
from rsavq_core.pipeline.placement import Placement
from rsavq_core.pipeline.source import SourceModel
from rsavq_core.progress import Progress
from rsavq_core.settings import get_settings


@dataclass
class Calibration:
    """What the block loop and end-to-end fine-tuning read; each part None when the run needs none."""

    tokens: torch.Tensor | None = None  # [calib_samples, calib_len] int64
    store: StatsStore | None = None  # the float model's per-block statistics
    cached: bool = False  # the statistics came from the cache
    walker: BlockInputs | None = None  # each block's inputs in the partly quantized model
    # the walker carries the float model's inputs and yields each block's Hessians (none stored)
    float_walk: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def calibration_tokens(tokenizer: object, cfg: QuantConfig, source: TextSource | None = None) -> torch.Tensor:
    """[calib_samples, calib_len] int64: the run's calibration windows (from ``source`` when given)."""
    return calibration_windows(
        tokenizer, cfg.calib_samples, cfg.calib_len, sampling=cfg.calib_sampling, seed=cfg.seed, source=source
    )


def stats_key(folder: Path, tokens: torch.Tensor, cfg: QuantConfig, compute_dtype: str = "float32") -> StatsKey:
    """The cache key of the statistics ``cfg`` needs on ``tokens`` ([S, T] int64) for the checkpoint in
    ``folder``, computed with forwards in ``compute_dtype``."""
    return StatsKey(
        fingerprint=model_fingerprint(folder),
        tokens_hash=tokens_hash(tokens),
        n_samples=cfg.calib_samples,
        seq_len=cfg.calib_len,
        fisher=cfg.fisher,
        with_grads=cfg.needs_gradients(),
        compute_dtype=compute_dtype,
    )


def calibration_store(
    model: nn.Module,
    tokens: torch.Tensor,  # [S, T] int64, ``calibration_tokens``
    folder: Path,
    cfg: QuantConfig,
    *,
    micro_batch: int = 4,
    progress: Progress | None = None,
    compute_dtype: str = "float32",
) -> tuple[StatsStore, bool]:
    """The statistics the config needs, from the cache when possible. Returns (store, was_cached)."""
    key = stats_key(folder, tokens, cfg, compute_dtype)
    store = StatsStore.find(key)
    if store is not None:
        return store, True
    return compute_statistics(model, tokens, key, micro_batch=micro_batch, progress=progress), False


def sequential_statistics(cfg: QuantConfig) -> bool:
    """Whether each block's Hessians come from the partly quantized model (``calib_inputs="quantized"``)."""
    return cfg.calib_inputs == "quantized" and cfg.needs_hessian()


def prepare_calibration(
    source: SourceModel,
    cfg: QuantConfig,
    placement: Placement,
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
    tokens = calibration_tokens(source.tokenizer, cfg, text)
    out = Calibration(tokens=tokens)
    if not layers_to_do:
        return out
    sequential = sequential_statistics(cfg)
    need_store = cfg.needs_gradients() or (cfg.needs_hessian() and not sequential)
    # Block-wise fine-tuning steps take the walker's micro-batches as they are.
    walk_batch = cfg.finetune_batch if block_steps else micro_batch
    track_float = bool(block_steps) and cfg.finetune_target == "model"
    if source.streamed is not None:
        return _streamed_calibration(
            source,
            cfg,
            placement,
            out,
            need_store,
            sequential or bool(block_steps),
            micro_batch,
            walk_batch,
            track_float,
            progress,
        )
    if need_store:
        t0 = time.perf_counter()
        out.store, out.cached = calibration_store(
            source.model,
            tokens,
            source.folder,
            cfg,
            micro_batch=micro_batch,
            progress=progress,
            compute_dtype=placement.compute_dtype,
        )
        out.timings["statistics"] = time.perf_counter() - t0
    if sequential or block_steps:
        out.walker = BlockInputs(
            source.model, tokens, micro_batch=walk_batch, track_float=track_float, progress=progress
        )
    return out


def _streamed_calibration(
    source: SourceModel,
    cfg: QuantConfig,
    placement: Placement,
    out: Calibration,
    need_store: bool,
    need_walker: bool,
    micro_batch: int,
    walk_batch: int,
    track_float: bool,
    progress: Progress | None,
) -> Calibration:
    """``prepare_calibration`` for a streamed model: statistics block by block, activations past the
    placement's budget spilled to its offload directory (checked for room first)."""
    assert source.streamed is not None and out.tokens is not None
    tokens = out.tokens
    if need_store:
        t0 = time.perf_counter()
        key = stats_key(source.folder, tokens, cfg, placement.compute_dtype)
        found = StatsStore.find(key)
        size = statistics_store_bytes(_linear_shapes(source, source.n_blocks), cfg)
        # decided on the whole model's store: a benchmark's block limit takes the path of a full run
        whole = statistics_store_bytes(_linear_shapes(source, len(source.layout.blocks)), cfg)
        if found is not None:
            out.store, out.cached = found, True
        elif _hessians_as_we_go(source, cfg, key, whole, need_walker):
            out.float_walk, need_walker = True, True  # computed per block by the walker, not stored
        else:
            _check_cache_room(size)
            levels = len(source.layout.blocks) + 1 if key.with_grads else 2
            per_level = 4.0 * tokens.numel() * _hidden_size(source)
            budget = boundary_budget(placement.activation_budget_bytes, per_level)
            if levels * per_level > budget:
                check_offload_dir(placement.offload_dir or default_offload_root(), levels * per_level - budget)
            activations = ActivationStore(budget, placement.offload_dir, placement.device)
            try:
                out.store = streamed_statistics(
                    source.streamed,
                    tokens,
                    key,
                    StatsStore(key),
                    activations,
                    micro_batch=micro_batch,
                    progress=progress,
                    limit=source.n_blocks,
                )
            finally:
                activations.close()
        out.timings["statistics"] = time.perf_counter() - t0
    if need_walker:
        first, kwargs = record_boundary(source.streamed, tokens, walk_batch)
        out.walker = BlockInputs.from_recorded(first, kwargs, tokens.shape[1], track_float=track_float)
    return out


def _linear_shapes(source: SourceModel, n_blocks: int) -> list[list[tuple[int, int]]]:
    """(out, in) of each quantized linear of the first ``n_blocks`` blocks, block by block."""
    layout = source.layout
    return [
        [
            (lin.out_features, lin.in_features)
            for lin in (linear_at(layout.blocks[i], n) for n in layout.linear_names(i))
        ]
        for i in range(n_blocks)
    ]


def _hessians_as_we_go(source: SourceModel, cfg: QuantConfig, key: StatsKey, size: float, walker: bool) -> bool:
    """Whether a streamed run computes its activation Hessians block by block as it quantizes
    instead of storing them first: when the store would pass ``RSAVQ_STATS_CACHE_GB`` (an 8B
    model's Hessians are ~75 GB) and nothing needs every block's statistics before the block loop
    (gradients come down from the head; shared codebooks sample every block; a walker is already
    busy). The same Hessians, from the same inputs: the same packed bytes, only not cached."""
    if key.with_grads or walker or size <= get_settings().stats_cache_gb * GIB:
        return False
    return get_method(cfg.method).shared_fit(cfg, source.n_blocks) is None


def _check_cache_room(size: float) -> None:
    """``ConfigError`` with the figures when the statistics cache's disk cannot take ``size`` bytes."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < size:
        raise ConfigError(
            f"this run's calibration statistics take {size / GIB:.2f} GiB in {root} (RSAVQ_CACHE_DIR), "
            f"which has {free / GIB:.2f} GiB free; free some space, point RSAVQ_CACHE_DIR elsewhere, "
            "or use fewer blocks' statistics (a method without gradients computes them as it goes)"
        )


def _hidden_size(source: SourceModel) -> int:
    config = getattr(source.model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    return int(getattr(config, "hidden_size", 0) or 0)
