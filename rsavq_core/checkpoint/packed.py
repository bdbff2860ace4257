"""The packed checkpoint: one directory, one safetensors file, the config in its metadata.

Layout of ``<out_dir>/``: ``config.json`` (+ ``generation_config.json``) of the source model,
the tokenizer files, and ``rsavq.safetensors`` holding every tensor. The safetensors metadata
(all str -> str) carries ``format`` = "rsavq", ``format_version``, ``method``, ``config``
(QuantConfig JSON), ``layers`` (JSON manifest, see ``manifest_entry``), ``source_model``,
``tied`` (JSON {alias: stored name}) and any caller-supplied extras. Loading dispatches on this
metadata only, never on a file name (style convention 2).

A quantized layer ``<name>`` stores ``<name>.<field>`` for each tensor its format writes (see
``rsavq_core.formats.vq`` and ``.scalar``), and ``<name>.bias`` fp16 [M] when it has a bias; its
manifest entry is ``{"kind", "out_features", "in_features", "has_bias"}`` plus the format's fields.
Tensors several layers share (``rsavq_shared.<key>...``, e.g. codebooks shared across blocks) are
stored once. A layer serving under two names (a quantized embedding and the head tied to it) is
stored under the first; the second's entry is ``{"same_as": first}``. Every other state_dict
entry is stored under its own name: floating tensors as fp16, integer ones unchanged; tensors tied
to an earlier entry are stored once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from rsavq_core.atomic import replacing_folder
from rsavq_core.checkpoint.manifest import layer_specs, read_layers
from rsavq_core.checkpoint.writer import TensorSpec, tensor_spec, write_canonical
from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.errors import ArtifactError, ConfigError
from rsavq_core.formats.base import SHARED_PREFIX, QuantizedLayer

log = logging.getLogger(__name__)

FORMAT = "rsavq"
# 2: a layer may omit what version 1 always stored (an identity ``perm``; codebooks shared across
# layers, stored once under ``rsavq_shared.``), so a version-1 reader must refuse it clearly.
FORMAT_VERSION = "2"
SUPPORTED_VERSIONS: tuple[str, ...] = ("1", "2")
WEIGHTS_FILE = "rsavq.safetensors"
QUANT_METHOD = "rsavq"  # config.json's quantization_config.quant_method (``rsavq_core.integrations.hf_quantizer``)
_RESERVED = ("format", "format_version", "method", "config", "layers", "source_model", "tied")


@dataclass
class PackedCheckpoint:
    """A packed checkpoint read back: layers hold unpacked indices/codes (int64 / uint8)."""

    path: Path  # the safetensors file
    metadata: dict[str, str]
    config: QuantConfig
    layers: dict[str, QuantizedLayer]
    other_state: dict[str, torch.Tensor]  # non-quantized state_dict entries, as stored
    tied: dict[str, str]  # alias -> name of the stored tensor it shares
    # layer -> {"g<i>_indices" | "codes": int32 words as stored}, validated against the manifest,
    # so that QuantLinear can take them without packing the unpacked codes again.
    packed: dict[str, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)


# The precision the checkpoint keeps every floating tensor outside the quantized layers in.
OTHER_TENSORS_DTYPE = torch.float16


def _other_tensors(model: nn.Module, skip: tuple[str, ...]) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """Non-quantized state_dict entries (fp16 if floating) and the {alias: stored name} of ties.

    Each is converted when the file is written, one at a time: a model's float16 copy never sits
    beside the model (4 GB of embeddings and head for an 8B model)."""
    specs: dict[str, TensorSpec] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for key, t in model.state_dict().items():
        if key.startswith(skip):
            continue  # the quantized layers' original weight/bias, or their QuantLinear buffers
        if t.device.type == "meta":
            raise ArtifactError(f"{key} holds no values (a streamed model's tensor that was never read in)")
        ident = (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        if t.is_floating_point():
            if t.numel() and _overflows_half(t.detach()):
                log.warning("%s overflows float16; stored values are not finite", key)
            specs[key] = tensor_spec(t.detach(), OTHER_TENSORS_DTYPE)
        else:
            specs[key] = tensor_spec(t.detach())
    return specs, tied


def _overflows_half(t: torch.Tensor) -> bool:
    """Whether finite values of ``t`` become infinite in float16 (|x| ≥ 65520 rounds to inf)."""
    low, high = torch.aminmax(t.float() if t.dtype != torch.float32 else t)
    low_f, high_f = float(low), float(high)
    if not (math.isfinite(low_f) and math.isfinite(high_f)):
        return False  # already not finite: nothing the conversion breaks
    return max(-low_f, high_f) >= 65520.0


def save_checkpoint(
    out_dir: str | Path,
    *,
    model: nn.Module,
    tokenizer: Any,
    layers: Mapping[str, QuantizedLayer],
    config: QuantConfig,
    source_model: str,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write the packed checkpoint to ``out_dir`` atomically and return ``out_dir``.

    Everything is written into a temporary sibling directory first; an existing ``out_dir`` is
    replaced only once that succeeded, so a crash never leaves a half-written checkpoint.
    ``model`` may be the FP model or one with QuantLinear modules already swapped in.
    """
    out = Path(out_dir)
    extra = dict(extra_metadata or {})
    for key, value in extra.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(f"extra metadata must map str to str, got {key!r}: {type(value).__name__}")
        if key in _RESERVED:
            raise ConfigError(f"extra metadata key {key!r} is reserved by the format")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")
    specs, manifest = layer_specs(layers)
    other, tied = _other_tensors(model, tuple(f"{name}." for name in layers))
    clash = sorted(set(other) & set(specs))
    if clash:
        raise ConfigError(f"tensor names clash between quantized layers and model state: {clash[:5]}")
    specs.update(other)
    metadata = {
        **extra,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": config.method,
        "config": config.to_json(),
        "source_model": source_model,
        "layers": json.dumps(manifest),
        "tied": json.dumps(tied),
    }
    hf: Any = model  # a transformers model: its config is not an nn.Module attribute to a type checker
    with replacing_folder(out) as tmp:  # the old checkpoint is removed only once the new one is in place
        hf.config.save_pretrained(tmp)
        _declare_quantization(tmp / "config.json")
        if getattr(hf, "generation_config", None) is not None:
            hf.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_canonical(specs, tmp / WEIGHTS_FILE, metadata)  # same content, same bytes (sha256)
    log.info("wrote %s (%d tensors, %d quantized layers)", out, len(specs), len(layers))
    return out


def hf_quantization_config() -> dict[str, str]:
    """The ``quantization_config`` of an artifact's config.json: transformers' ``from_pretrained``
    then loads it through our registered quantizer (``rsavq_core.integrations.hf_quantizer``)."""
    return {"quant_method": QUANT_METHOD, "format": FORMAT, "format_version": FORMAT_VERSION}


def _declare_quantization(config_file: Path) -> None:
    config = json.loads(config_file.read_text())
    config["quantization_config"] = hf_quantization_config()
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_checkpoint(path: str | Path) -> PackedCheckpoint:
    """Read and validate a checkpoint directory (or its ``rsavq.safetensors`` file directly)."""
    file = Path(path)
    if file.is_dir():
        file = file / WEIGHTS_FILE
    if not file.is_file():
        raise ArtifactError(f"no packed checkpoint at {file}")
    try:
        with safe_open(str(file), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            check_header(metadata, file)
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{file}: unreadable safetensors file (truncated or corrupt?): {exc}") from exc
    manifest = _json(metadata, "layers", file)
    tied = _json(metadata, "tied", file) if "tied" in metadata else {}
    try:
        config = QuantConfig.from_dict(_json(metadata, "config", file), strict=False)
    except (ConfigError, TypeError) as exc:
        raise ArtifactError(f"{file}: invalid config in metadata: {exc}") from exc
    layers, readers = read_layers(file, manifest, tensors)
    for key in set().union(*(reader.shared_used for reader in readers.values())):
        tensors.pop(key)  # a shared tensor belongs to the layers that use it, not to the model's state
    prefixes = (SHARED_PREFIX, *(f"{name}." for name in manifest))
    stray = sorted(key for key in tensors if key.startswith(prefixes))
    if stray:
        raise ArtifactError(f"{file}: tensors not described by the layer manifest: {stray[:5]}")
    for alias, target in tied.items():
        if not isinstance(target, str) or target not in tensors:
            raise ArtifactError(f"{file}: {alias} is tied to {target}, which is not stored")
    return PackedCheckpoint(
        path=file,
        metadata=metadata,
        config=config,
        layers=layers,
        other_state=tensors,
        tied=tied,
        packed={name: reader.packed for name, reader in readers.items()},
    )


def check_header(metadata: dict[str, str], file: Path) -> None:
    if metadata.get("format") != FORMAT:
        raise ArtifactError(f"{file}: not an rsavq checkpoint (metadata format={metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise ArtifactError(
            f"{file}: unsupported format_version {version!r}; this version of rsavq "
            f"reads format_version {', '.join(SUPPORTED_VERSIONS)}"
        )


def _json(metadata: dict[str, str], key: str, file: Path) -> dict[str, Any]:
    try:
        value = json.loads(metadata[key])
    except KeyError as exc:
        raise ArtifactError(f"{file}: metadata lacks {key!r}") from exc
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{file}: metadata {key!r} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ArtifactError(f"{file}: metadata {key!r} must be a JSON object")
    return value
