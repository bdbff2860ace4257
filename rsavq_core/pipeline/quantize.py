"""The quantization run as one plain function: model id + config -> packed layers (+ checkpoint).

Used by the ``rsavq`` command line and the Celery worker; it reports progress through a callback
and never prints. Its steps, each a module of this package: the source model and what an earlier
run finished (``source``), the calibration windows and statistics (``calibration``), what layers
of one type share and the block loop (``blocks``), then end-to-end fine-tuning
(``rsavq_core.finetune.end_to_end``). Validation happens before any heavy work: the config is
validated on construction, the model id is resolved (fast, offline) before the model is loaded,
and the model's layers are checked before calibration starts.
"""

from __future__ import annotations

import resource
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.data.text_files import TextSource
from rsavq_core.errors import ConfigError
from rsavq_core.finetune.end_to_end import finetune_quantized_model
from rsavq_core.formats.base import QuantizedLayer
from rsavq_core.pipeline.blocks import BlockLoop, LayerCallback, fit_shared
from rsavq_core.pipeline.calibration import prepare_calibration
from rsavq_core.pipeline.embeddings import float_head_hessian, quantize_embeddings, with_embeddings
from rsavq_core.pipeline.placement import Placement
from rsavq_core.pipeline.resume import CheckpointedLayers
from rsavq_core.pipeline.source import finished_layers, load_source
from rsavq_core.progress import Progress


@dataclass
class QuantizeResult:
    model: nn.Module  # the source model: float weights; norms as fine-tuning left them
    tokenizer: object
    # full dotted linear name -> packed layer; a streamed run's stay in files, read when asked for
    layers: Mapping[str, QuantizedLayer]
    reports: dict[str, dict[str, Any]]  # per-layer bits / errors / seconds
    config: QuantConfig
    model_id: str
    model_finetune: dict[str, Any] = field(default_factory=dict)  # end-to-end fine-tuning's report
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    stats_cached: bool = False  # the calibration statistics came from the cache
    # the share of the decoder blocks' weights quantized and what stayed in float (``Coverage.report``)
    coverage: dict[str, Any] = field(default_factory=dict)
    peak_rss_gb: float = 0.0
    out_dir: Path | None = None


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


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
    placement: Placement | None = None,
    blocks: int | None = None,
    allow_partial: bool = False,
) -> QuantizeResult:
    """Quantize every nn.Linear of the decoder blocks of ``model_id`` with ``cfg``.

    Writes a packed checkpoint to ``out_dir`` when given. Layers are quantized block by block from
    the float model's statistics (VPTQ-style, spec §11.3), or, with ``calib_inputs="quantized"``,
    from Hessians of each block's inputs in the partly quantized model (``calibration.sequential``).
    With ``checkpoint_dir`` every finished layer is saved there and layers found there are not quantized again, so a
    killed run resumes from its last finished layer. ``progress`` may raise (``JobCancelled``) to
    stop the run between layers; ``on_layer(name, report)`` sees each layer's report.
    ``calibration_text``: the user's own calibration text instead of the bundled split; the
    result's config records its sha256 (``calib_data``). ``placement``: the device, and whether the
    model is streamed block by block (default: the settings; streamed, ``result.model`` is then a
    skeleton whose quantized linears hold no weights, and ``result.layers`` are read from their
    checkpoint files when asked for). ``blocks``: quantize only the first ones (benchmarks).
    ``allow_partial``: go on with a model whose linears hold less than 90 % of its blocks' weights
    (``rsavq_core.models.coverage``); the result's ``coverage`` lists what stayed in float either way.
    """
    started = time.perf_counter()
    cfg = _with_calibration_text(cfg, calibration_text)
    if blocks is not None and (blocks < 1 or out_dir is not None):
        raise ConfigError("a block limit (benchmarks) must be at least 1 and writes no packed checkpoint")
    placement = placement or Placement.from_settings()
    source = load_source(model_id, cfg, placement, blocks=blocks, allow_partial=allow_partial)
    timings = {"load": time.perf_counter() - started}
    scratch = None
    if source.streamed is not None and checkpoint_dir is None:  # where a streamed run's layers wait
        scratch = tempfile.TemporaryDirectory(prefix="rsavq-layers-")
        checkpoint_dir = Path(scratch.name)
    checkpoint, resumed = finished_layers(source, cfg, checkpoint_dir)
    todo = len(resumed) < len(source.names)
    calib = prepare_calibration(
        source,
        cfg,
        placement,
        layers_to_do=todo,
        text=calibration_text,
        micro_batch=micro_batch,
        progress=progress,
    )
    timings.update(calib.timings)

    t0 = time.perf_counter()
    shared = fit_shared(source, calib, cfg, progress, resumed) if todo else {}
    if shared:
        timings["shared codebooks"] = time.perf_counter() - t0
        t0 = time.perf_counter()
    loop = BlockLoop(source, cfg, calib, shared, checkpoint, resumed, progress, on_layer)
    loop.run()
    timings["quantize"] = time.perf_counter() - t0
    layers: Mapping[str, QuantizedLayer] = loop.layers
    norms = loop.norms
    if source.streamed is not None and checkpoint is not None:
        layers = CheckpointedLayers(checkpoint, [full for _, _, full in source.names], keep_alive=scratch)
    model_finetune: dict[str, Any] = {}
    if cfg.model_finetune_steps and calib.tokens is not None:
        t0 = time.perf_counter()
        layers, tuned_norms, model_finetune = finetune_quantized_model(
            source.model, loop.layers, norms, calib.tokens, cfg, progress, checkpoint_dir
        )
        norms.update(tuned_norms)
        timings["model fine-tune"] = time.perf_counter() - t0
    if source.streamed is not None:  # the packed checkpoint and evaluation need embeddings, norm and head
        source.streamed.load_rest()
    t0 = time.perf_counter()
    head_hessian = None
    if cfg.embedding_bits is not None:  # of the float model: before its norms are the tuned ones
        head_hessian = float_head_hessian(source, cfg, calib.tokens, calibration_text, micro_batch)
    with torch.no_grad():  # the float model was the teacher until here; now it carries the tuned norms
        for name, value in norms.items():
            source.model.get_parameter(name).copy_(value)
    if cfg.embedding_bits is not None:
        embeddings = quantize_embeddings(source.model, cfg.embedding_bits, head_hessian=head_hessian)
        layers = with_embeddings(layers, embeddings)
        timings["embeddings"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    result = QuantizeResult(
        model=source.model,
        tokenizer=source.tokenizer,
        layers=layers,
        reports=loop.reports,
        config=cfg,
        model_id=model_id,
        model_finetune=model_finetune,
        timings=timings,
        stats_cached=calib.cached,
        peak_rss_gb=peak_rss_gb(),
        coverage=source.coverage.report() if source.coverage else {},
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
