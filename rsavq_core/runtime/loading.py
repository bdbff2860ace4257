"""Loading a packed checkpoint into a transformers model: ``QuantLinear`` swapped in for each
quantized linear, every other tensor loaded as stored."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rsavq_core.checkpoint.packed import PackedCheckpoint, read_checkpoint
from rsavq_core.errors import ArtifactError, ConfigError, UnsupportedShapeError
from rsavq_core.formats.base import QuantizedLayer
from rsavq_core.models.layout import replace_module
from rsavq_core.runtime.qembedding import QuantEmbedding
from rsavq_core.runtime.qlinear import QuantLinear

log = logging.getLogger(__name__)


def quantize_in_place(
    model: nn.Module,
    layers: Mapping[str, QuantizedLayer],
    cache_weight: bool = True,
    packed: dict[str, dict[str, torch.Tensor]] | None = None,
) -> nn.Module:
    """Swap a QuantLinear in for each ``nn.Linear`` named in ``layers`` (a ``QuantEmbedding`` for an
    ``nn.Embedding``); returns ``model``.

    Each is placed on the device of the module it replaces. ``packed`` (per layer, as in
    ``PackedCheckpoint.packed``) passes already-packed word streams through.
    """
    for name, layer in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as exc:
            raise ConfigError(f"model has no module {name!r} to quantize") from exc
        if isinstance(old, nn.Embedding):
            _swap_embedding(model, name, old, layer, (packed or {}).get(name))
            continue
        if not isinstance(old, (nn.Linear, QuantLinear)):
            raise ConfigError(f"{name} is a {type(old).__name__}, not an nn.Linear")
        if (old.out_features, old.in_features) != (layer.out_features, layer.in_features):
            raise UnsupportedShapeError(
                f"{name}: quantized layer is {layer.out_features}x{layer.in_features}, the model's linear "
                f"is {old.out_features}x{old.in_features}"
            )
        device = _device_for(model, next(iter(old.buffers() if isinstance(old, QuantLinear) else old.parameters())))
        qlin = QuantLinear(layer, cache_weight=cache_weight, packed=(packed or {}).get(name))
        replace_module(model, name, qlin.to(device))
    return model


def _swap_embedding(
    model: nn.Module, name: str, old: nn.Embedding, layer: QuantizedLayer, packed: dict[str, torch.Tensor] | None
) -> None:
    if (old.num_embeddings, old.embedding_dim) != (layer.out_features, layer.in_features):
        raise UnsupportedShapeError(
            f"{name}: quantized embedding is {layer.out_features}x{layer.in_features}, the model's is "
            f"{old.num_embeddings}x{old.embedding_dim}"
        )
    dtype = old.weight.dtype if old.weight.is_floating_point() else torch.float32
    replace_module(model, name, QuantEmbedding(layer, old, dtype, packed).to(_device_for(model, old.weight)))


def _device_for(model: nn.Module, replaced: torch.Tensor) -> torch.device:
    """Where the quantized module replacing one holding ``replaced`` goes: its device, or for a
    streamed skeleton's dropped (meta) tensor, where the model's other tensors are."""
    if replaced.device.type != "meta":
        return replaced.device
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """Skip random weight init while building a model whose weights are loaded right after.

    Random init of a 135M model takes ~9 s on 2 CPU cores; building it under transformers'
    ``no_init_weights`` takes ~0.05 s (measured here). Non-persistent buffers such as rotary
    ``inv_freq`` are computed in ``__init__`` and stay correct.
    """
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older/newer transformers without it: correct, only slower
        yield
        return
    with no_init_weights():
        yield


# The reference path keeps each layer's dequantized weight (re-dequantizing per call costs more than
# the matmul on a CPU) only while all of them together stay under this: past it, that cache would
# be the float copy of the whole model that loading from packed tensors exists to avoid.
DENSE_CACHE_LIMIT_BYTES = 4 * 2**30


def load_quantized_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_weight: bool | None = None,
) -> tuple[nn.Module, Any, PackedCheckpoint]:
    """(model in eval mode, tokenizer or None, PackedCheckpoint) from a packed checkpoint directory.

    The model is built from the checkpoint's ``config.json`` with every parameter on the meta
    device (buffers such as rotary frequencies are computed as usual), its quantized linears are
    swapped for QuantLinear, and the other tensors are assigned (cast to ``dtype``): no float copy
    of the model exists on the way, so a model that fits packed loads. Tied weights are re-tied and
    the model is moved to ``device``. ``cache_weight``: keep dequantized weights on the reference
    path (default: when all of them fit ``DENSE_CACHE_LIMIT_BYTES``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from rsavq_core.models.streamed import parameters_on_meta

    art = read_checkpoint(path)
    folder = art.path.parent
    if not (folder / "config.json").is_file():
        raise ArtifactError(f"{folder} has no config.json next to {art.path.name}")
    with _skip_init(), parameters_on_meta():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)), dtype=dtype)
    if cache_weight is None:
        dense = sum(layer.out_features * layer.in_features for layer in art.layers.values())
        cache_weight = dense * torch.finfo(dtype).bits // 8 <= DENSE_CACHE_LIMIT_BYTES
    quantize_in_place(model, art.layers, cache_weight=cache_weight, packed=art.packed)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in art.other_state.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ArtifactError(f"{art.path}: tensors the model does not have: {result.unexpected_keys[:5]}")
    prefixes = tuple(f"{name}." for name in art.layers)
    missing = [k for k in result.missing_keys if not k.startswith(prefixes) and k not in art.tied]
    if missing:
        raise ArtifactError(f"{art.path}: the model needs tensors the checkpoint lacks: {missing[:5]}")
    for alias, target in art.tied.items():
        alias_mod, _, alias_attr = alias.rpartition(".")
        target_mod, _, target_attr = target.rpartition(".")
        shared = getattr(model.get_submodule(target_mod), target_attr)
        setattr(model.get_submodule(alias_mod), alias_attr, shared)
    empty = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if empty:
        raise ArtifactError(f"{art.path}: the model needs tensors the checkpoint lacks: {empty[:5]}")
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    model.to(device).eval()
    tokenizer = None
    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    else:
        log.warning("%s holds no tokenizer files; returning tokenizer=None", folder)
    return model, tokenizer, art


def load_float_model(
    model_id: str, device: torch.device | None = None, stream: bool | None = None
) -> tuple[nn.Module, Any, Path]:
    """(float model for evaluation, tokenizer, its folder): streamed block by block from its files
    (``StreamedCausalLM``) unless ``stream`` is False or the checkpoint cannot be streamed (and
    ``stream`` is not True), else loaded whole on the CPU."""
    from rsavq_core.errors import UnsupportedModelError
    from rsavq_core.models.resolve import load_model, load_tokenizer, resolve_model
    from rsavq_core.runtime.streamed_lm import StreamedCausalLM

    folder = resolve_model(model_id)
    if stream is not False:
        try:
            return StreamedCausalLM(folder, device or torch.device("cpu")), load_tokenizer(folder), folder
        except UnsupportedModelError as exc:
            if stream:
                raise
            log.info("evaluating the model whole: %s", exc)
    return load_model(str(folder))


def load_any(
    path_or_model: str, *, device: torch.device | None = None, stream: bool | None = False
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model, tokenizer, what was loaded) from a packed checkpoint folder or a float model id.

    A float model is loaded whole unless ``stream`` allows streaming (``load_float_model``: for
    evaluation; a streamed model has no ``generate``)."""
    from rsavq_core.checkpoint.packed import WEIGHTS_FILE
    from rsavq_core.runtime.streamed_lm import StreamedCausalLM

    if (Path(path_or_model) / WEIGHTS_FILE).is_file():
        model, tokenizer, checkpoint = load_quantized_model(path_or_model, device=device or "cpu")
        return model, tokenizer, {"artifact": path_or_model, "method": checkpoint.metadata.get("method")}
    model, tokenizer, folder = load_float_model(path_or_model, device, stream)
    return (
        model,
        tokenizer,
        {"model": path_or_model, "folder": str(folder), "streamed": isinstance(model, StreamedCausalLM)},
    )
