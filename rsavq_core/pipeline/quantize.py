"""The quantization job as one plain function: model id + config -> packed layers (+ checkpoint).

Used by the ``rsavq`` command line and (later) by the Celery worker; it reports progress through
a callback and never prints. Validation happens before any heavy work: the config is validated on
construction, the model id is resolved (fast, offline) before the model is loaded, and the model's
layers are checked before calibration starts.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rsavq_core.calibration.cache import StatsKey, StatsStore, compute_statistics
from rsavq_core.calibration.sequential import BlockInputs, with_hessians
from rsavq_core.calibration.statistics import LayerStats
from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.data.text_files import TextSource
from rsavq_core.data.windows import calibration_windows, tokens_hash
from rsavq_core.errors import ConfigError, UnsupportedModelError
from rsavq_core.finetune.blockwise import finetune_quantized_block
from rsavq_core.finetune.end_to_end import finetune_quantized_model
from rsavq_core.formats.base import QuantizedLayer
from rsavq_core.methods.registry import get_method
from rsavq_core.models.resolve import find_decoder_layout, load_model, model_fingerprint, resolve_model
from rsavq_core.pipeline.resume import FinishedLayers
from rsavq_core.progress import Progress

log = logging.getLogger(__name__)
LayerCallback = Callable[[str, dict], None]  # (full layer name, report)


@dataclass
class QuantizeResult:
    model: nn.Module  # the source model: float weights; norms as fine-tuning left them
    tokenizer: object
    layers: dict[str, QuantizedLayer]  # full dotted linear name -> packed layer
    reports: dict[str, dict[str, Any]]  # per-layer bits / errors / seconds
    config: QuantConfig
    model_id: str
    model_finetune: dict[str, Any] = field(default_factory=dict)  # end-to-end fine-tuning's report
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    stats_cached: bool = False  # the calibration statistics came from the cache
    peak_rss_gb: float = 0.0
    out_dir: Path | None = None


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


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


def quantize_layer(
    weight: torch.Tensor,  # [M, N] floating
    bias: torch.Tensor | None,  # [M] floating
    stats: LayerStats | None,
    cfg: QuantConfig,
    shared: Any = None,  # what the method's shared fit gave this layer's type, or None
) -> tuple[QuantizedLayer, dict[str, Any]]:
    """One linear layer by the config's method (``rsavq_core.methods``): the packed layer and its report."""
    method = get_method(cfg.method)
    if shared is None:  # methods written before shared fits take four arguments
        return method.quantize_layer(weight, bias, stats, cfg)
    return method.quantize_layer(weight, bias, stats, cfg, shared)


def quantize_model(
    model_id: str,
    cfg: QuantConfig,
    *,
    out_dir: Path | None = None,
    progress: Progress | None = None,
    micro_batch: int = 4,
    checkpoint_dir: Path | None = None,
    on_layer: LayerCallback | None = None,
    calibration_text: TextSource | None = None,
) -> QuantizeResult:
    """Quantize every nn.Linear of the decoder blocks of ``model_id`` with ``cfg``.

    Writes a packed checkpoint to ``out_dir`` when given. Layers are quantized block by block from
    the float model's statistics (VPTQ-style, spec §11.3), or, with ``calib_inputs="quantized"``,
    from Hessians of each block's inputs in the partly quantized model (``calibration.sequential``).
    With ``checkpoint_dir`` every finished layer is saved there and layers found there are not quantized again, so a
    killed run resumes from its last finished layer. ``progress`` may raise (``JobCancelled``) to
    stop the run between layers; ``on_layer(name, report)`` sees each layer's report.
    ``calibration_text``: the user's own calibration text instead of the bundled split; the
    result's config records its sha256 (``calib_data``).
    """
    started = time.perf_counter()
    cfg = _with_calibration_text(cfg, calibration_text)
    folder = resolve_model(model_id)  # fails fast, before the model is loaded
    model, tokenizer, _ = load_model(str(folder))
    layout = find_decoder_layout(model)  # fails fast on a model with no linear layers
    timings = {"load": time.perf_counter() - started}
    names = [(i, n, f"{layout.blocks_path}.{i}.{n}") for i in range(len(layout.blocks)) for n in layout.linear_names(i)]
    shapes = {full: _shape(layout.blocks[i].get_submodule(n)) for i, n, full in names}
    get_method(cfg.method).check_layers(cfg, shapes)  # before any calibration: a config the model cannot take
    ckpt = FinishedLayers(checkpoint_dir, cfg, model_fingerprint(folder)) if checkpoint_dir else None
    resumed: dict[str, tuple[QuantizedLayer, dict[str, Any]]] = {}
    for _, _, full in names:
        finished = ckpt.load(full) if ckpt is not None else None
        if finished is not None:
            resumed[full] = finished
    if resumed:
        log.info("resuming: %d of %d layers already checkpointed", len(resumed), len(names))

    todo = len(resumed) < len(names)
    sequential = cfg.calib_inputs == "quantized" and cfg.needs_hessian()
    block_steps = cfg.block_finetune_steps or 0  # resolved to the method's default on construction
    need_tokens = (todo and (cfg.needs_calibration() or block_steps)) or cfg.model_finetune_steps
    tokens = calibration_tokens(tokenizer, cfg, calibration_text) if need_tokens else None
    store, cached, walker = None, False, None
    if tokens is not None and todo and (cfg.needs_gradients() or (cfg.needs_hessian() and not sequential)):
        t0 = time.perf_counter()
        store, cached = calibration_store(model, tokens, folder, cfg, micro_batch=micro_batch, progress=progress)
        timings["statistics"] = time.perf_counter() - t0
    if tokens is not None and todo and (sequential or block_steps):
        # Block-wise fine-tuning steps take the walker's micro-batches as they are.
        walk_batch = cfg.finetune_batch if block_steps else micro_batch
        track_float = bool(block_steps) and cfg.finetune_target == "model"
        walker = BlockInputs(model, tokens, micro_batch=walk_batch, track_float=track_float, progress=progress)

    t0 = time.perf_counter()
    shared = _fit_shared(layout.blocks, names, store, cfg, progress, resumed) if todo else {}
    if shared:
        timings["shared codebooks"] = time.perf_counter() - t0
        t0 = time.perf_counter()
    layers: dict[str, QuantizedLayer] = {}
    reports: dict[str, dict[str, Any]] = {}
    norms: dict[str, torch.Tensor] = {}  # full name -> normalisation weight tuned block-wise
    for index, block in enumerate(layout.blocks):
        in_block = {name: full for i, name, full in names if i == index}
        done = {name: resumed[full] for name, full in in_block.items() if full in resumed}
        block_norms = ckpt.load_norms(index) if ckpt is not None else {}
        if len(done) < len(in_block):
            stats = store.load_block(index) if store is not None else {}
            if sequential and walker is not None:
                stats = {name: with_hessians(stats.get(name), fresh) for name, fresh in walker.hessians(block).items()}
            fresh = _quantize_block(block, [n for n in in_block if n not in done], stats, cfg, shared)
            if block_steps and walker is not None:
                fresh, block_norms = finetune_quantized_block(
                    block, {**done, **fresh}, walker, cfg, progress, f"fine-tune block {index}"
                )
                if ckpt is not None:
                    ckpt.save_norms(index, block_norms)
            for name, (layer, report) in fresh.items():
                if ckpt is not None:
                    ckpt.save(in_block[name], layer, report)
            done.update(fresh)
        for name, full in in_block.items():
            layers[full], reports[full] = done[name]
            if on_layer:
                on_layer(full, reports[full])
            if progress:
                progress("quantize", len(layers), len(names))
        norms.update({f"{layout.blocks_path}.{index}.{name}": value for name, value in block_norms.items()})
        if walker is not None and index + 1 < len(layout.blocks):
            walker.advance(block, {name: done[name][0] for name in in_block}, block_norms)
    timings["quantize"] = time.perf_counter() - t0
    model_finetune: dict[str, Any] = {}
    if cfg.model_finetune_steps and tokens is not None:
        t0 = time.perf_counter()
        layers, tuned_norms, model_finetune = finetune_quantized_model(
            model, layers, norms, tokens, cfg, progress, checkpoint_dir
        )
        norms.update(tuned_norms)
        timings["model fine-tune"] = time.perf_counter() - t0
    with torch.no_grad():  # the float model was the teacher until here; now it carries the tuned norms
        for name, value in norms.items():
            model.get_parameter(name).copy_(value)
    timings["total"] = time.perf_counter() - started
    result = QuantizeResult(
        model=model,
        tokenizer=tokenizer,
        layers=layers,
        reports=reports,
        config=cfg,
        model_id=model_id,
        model_finetune=model_finetune,
        timings=timings,
        stats_cached=cached,
        peak_rss_gb=peak_rss_gb(),
    )
    if out_dir is not None:
        result.out_dir = save_result(result, Path(out_dir))
    return result


def _with_calibration_text(cfg: QuantConfig, text: TextSource | None) -> QuantConfig:
    if text is None:
        if cfg.calib_data is not None:
            raise ConfigError(f"this config was calibrated on a text with sha256 {cfg.calib_data}: pass that text")
        return cfg
    if cfg.calib_data not in (None, text.sha256):
        raise ConfigError(f"this config names calibration text {cfg.calib_data}, not {text.label}")
    return cfg.replace(calib_data=text.sha256)


def _shape(module: nn.Module) -> tuple[int, int]:
    if not isinstance(module, nn.Linear):
        raise UnsupportedModelError(f"a {type(module).__name__} is not an nn.Linear")
    return module.out_features, module.in_features


def _linear(block: nn.Module, name: str) -> nn.Linear:
    module = block.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise UnsupportedModelError(f"{name} is a {type(module).__name__}, not an nn.Linear")
    return module


def _quantize_block(
    block: nn.Module, names: list[str], stats: dict[str, LayerStats], cfg: QuantConfig, shared: dict[str, Any]
) -> dict[str, tuple[QuantizedLayer, dict[str, Any]]]:
    """The named linears of one block (names relative to it), each quantized by the config's method."""
    out = {}
    for name in names:
        module = _linear(block, name)
        out[name] = quantize_layer(module.weight.detach(), module.bias, stats.get(name), cfg, shared.get(name))
    return out


def _fit_shared(
    blocks: Any,  # the decoder blocks (an nn.ModuleList)
    names: list[tuple[int, str, str]],  # (block index, name in the block, full name) of every linear
    store: StatsStore | None,
    cfg: QuantConfig,
    progress: Progress | None,
    resumed: dict[str, tuple[QuantizedLayer, dict[str, Any]]],  # full name -> layer an earlier run finished
) -> dict[str, Any]:
    """What the method shares between the blocks' layers of one type (name in the block -> it), fitted
    on every block's layer and its float statistics before the per-block pass; {} when nothing."""
    fit = get_method(cfg.method).shared_fit(cfg, len(blocks))
    if fit is None:
        return {}
    for index, block in enumerate(blocks):
        stats = store.load_block(index) if store is not None else {}
        for _, name, _ in (entry for entry in names if entry[0] == index):
            fit.add(name, _linear(block, name).weight.detach(), stats.get(name))
        if progress:
            progress("shared codebooks: sample", index + 1, len(blocks))
    finished = {name: resumed[full][0] for _, name, full in names if full in resumed}
    return fit.fit(finished)


def save_result(result: QuantizeResult, out_dir: Path) -> Path:
    """Write the packed checkpoint of a finished run.

    Its bytes depend only on the layers, the model's other tensors and the config, never on how
    long the run took or whether statistics were cached (those are in the run's summary): the same
    inputs give the same sha256, and a resumed job publishes the artifact an uninterrupted one would.
    """
    from rsavq_core.checkpoint.packed import save_checkpoint

    return save_checkpoint(
        out_dir,
        model=result.model,
        tokenizer=result.tokenizer,
        layers=result.layers,
        config=result.config,
        source_model=result.model_id,
    )
