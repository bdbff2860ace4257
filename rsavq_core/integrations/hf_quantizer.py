"""Loading a packed checkpoint with transformers' own ``from_pretrained``.

After ``import rsavq_core``, ``AutoModelForCausalLM.from_pretrained(artifact_dir)`` returns the
quantized model with our ``QuantLinear`` modules: the artifact's ``config.json`` carries
``quantization_config: {"quant_method": "rsavq", ...}``, which transformers hands to the quantizer
registered here through its public ``register_quantization_config`` / ``register_quantizer``.

How: before loading, every quantized linear becomes a placeholder module whose buffers have the
file's tensor names, shapes and dtypes (read from the safetensors header), so transformers loads
every tensor itself (devices, dtype of the other tensors, tied embeddings, its load report with
nothing missing or unexpected); after loading, each placeholder's tensors are validated by the
format's reader, exactly as ``read_checkpoint`` does, and become a ``QuantLinear``. Saving such a
model through transformers is refused: ``packed_checkpoint.save_checkpoint`` writes our format.

This module imports torch and transformers; ``rsavq_core`` registers it only once
``transformers.quantizers`` is imported (``rsavq_core.integrations.hf_hook``), so importing the library alone
(as the torch-free API does) never pulls them in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

# From the submodules: registration runs right after quantizers.auto has executed, while the
# package ``transformers.quantizers`` may still be initialising.
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from rsavq_core.checkpoint.manifest import read_layer, split_aliases
from rsavq_core.checkpoint.packed import (
    FORMAT,
    FORMAT_VERSION,
    QUANT_METHOD,
    WEIGHTS_FILE,
    check_header,
)
from rsavq_core.errors import ArtifactError, ConfigError
from rsavq_core.formats.base import SHARED_PREFIX, LayerReader, QuantizedLayer
from rsavq_core.models.layout import replace_module
from rsavq_core.runtime.qembedding import QuantEmbedding
from rsavq_core.runtime.qlinear import QuantLinear

SHARED_MODULE = SHARED_PREFIX.rstrip(".")
_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


class RsavqConfig(QuantizationConfigMixin):
    """What config.json says about the quantization; the layers' own settings are in the file."""

    def __init__(self, format: str = FORMAT, format_version: str = FORMAT_VERSION, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]  # a registered name, not a built-in enum member
        self.format, self.format_version = format, format_version
        for key, value in kwargs.items():
            if key != "quant_method":
                setattr(self, key, value)


class _Packed(nn.Module):
    """A quantized layer's stored tensors under their file names, until it becomes a QuantLinear."""


def _mirror(root: nn.Module, prefix: str, header: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
    """Empty (meta) buffers under ``root`` for every file tensor ``<prefix>.<a>.<b>``, as ``a.b``."""
    for key, (dtype, shape) in header.items():
        if not key.startswith(prefix + "."):
            continue
        *path, leaf = key[len(prefix) + 1 :].split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, _Packed())
            module = module._modules[part]  # type: ignore[assignment]
        module.register_buffer(leaf, torch.empty(shape, dtype=dtype, device="meta"))


def _untie(model: nn.Module, quantized: tuple[str, ...]) -> None:
    """Drop transformers' ties of parameters under the ``quantized`` prefixes (a head tied to a
    quantized embedding): the quantized layers hold those tensors, and no parameter is left to tie."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        for target, source in list(tied.items()):
            if str(target).startswith(quantized) or str(source).startswith(quantized):
                tied.pop(target)


class RsavqHfQuantizer(HfQuantizer):
    """transformers' side of a pre-quantized rsavq checkpoint (see the module's docstring)."""

    requires_calibration = True  # only pre-quantized checkpoints: quantizing is the pipeline's job

    def update_attn_implementation(self, config: Any) -> Any:
        # The one hook that sees the config before the weights file is looked up: ours is not
        # model.safetensors. (Not written into config.json, so that a transformers without this
        # quantizer fails loudly instead of loading random linears.)
        if getattr(config, "transformers_weights", None) is None:
            config.transformers_weights = WEIGHTS_FILE
        return config

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        if isinstance(device_map, dict):
            devices = {str(d) for d in device_map.values()}
            if "disk" in devices or ("cpu" in devices and len(devices) > 1):
                raise ConfigError("rsavq checkpoints cannot be offloaded to disk or split between CPU and GPU")

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        files = kwargs.get("checkpoint_files") or []
        if len(files) != 1:
            raise ArtifactError(f"an rsavq checkpoint is one {WEIGHTS_FILE}, got {files}")
        self.file = Path(files[0])
        with safe_open(str(self.file), framework="pt") as fh:  # the header only: this runs on meta
            self.metadata = dict(fh.metadata() or {})
            header = {}
            for key in fh.keys():
                part = fh.get_slice(key)
                header[key] = (_DTYPES[part.get_dtype()], tuple(part.get_shape()))
        check_header(self.metadata, self.file)
        # A layer serving under a second name (the head tied to a quantized embedding) is built
        # from its first name's tensors after loading.
        self.manifest, self.same_as = split_aliases(self.file, json.loads(self.metadata["layers"]))
        self.embeddings: dict[str, tuple[nn.Embedding, torch.dtype]] = {}  # and the dtype of its lookups
        for name, entry in self.manifest.items():
            old = model.get_submodule(name)
            shape = (entry.get("out_features"), entry.get("in_features"))
            if isinstance(old, nn.Embedding) and (old.num_embeddings, old.embedding_dim) == shape:
                self.embeddings[name] = (old, old.weight.dtype)  # its padding index and scale
            elif not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != shape:
                raise ArtifactError(f"{self.file}: {name} is not a {shape[0]}x{shape[1]} nn.Linear in this model")
            placeholder = _Packed()
            _mirror(placeholder, name, header)
            replace_module(model, name, placeholder)
        for alias in self.same_as:
            replace_module(model, alias, _Packed())  # the file holds nothing under its name
        _untie(model, tuple(f"{name}." for name in [*self.manifest, *self.same_as]))
        shared = _Packed()
        _mirror(shared, SHARED_MODULE, header)
        model.add_module(SHARED_MODULE, shared)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        shared_module = model._modules.pop(SHARED_MODULE)
        assert shared_module is not None
        shared = {SHARED_PREFIX + k: v.cpu() for k, v in shared_module.state_dict().items()}
        used: set[str] = set()
        layers: dict[str, QuantizedLayer] = {}
        for name, entry in self.manifest.items():
            placeholder = model.get_submodule(name)
            stored = placeholder.state_dict()
            device = next(iter(stored.values())).device if stored else torch.device("cpu")
            if device.type == "meta":
                raise ArtifactError(f"{name} was not loaded (offloaded?): rsavq layers must be on a device")
            # The format's reader checks everything read_checkpoint checks, on the CPU, in stored dtypes.
            tensors = {f"{name}.{k}": v.cpu() for k, v in stored.items()} | shared
            reader = LayerReader(self.file, name, entry, tensors)
            layer = read_layer(reader)
            stray = sorted(k for k in tensors if k.startswith(f"{name}."))
            if stray:
                raise ArtifactError(f"{self.file}: tensors not described by the layer manifest: {stray[:5]}")
            used |= reader.shared_used
            layers[name] = layer
            module: nn.Module = QuantLinear(layer, packed=reader.packed)
            if name in self.embeddings:
                module = QuantEmbedding(layer, *self.embeddings[name], packed=reader.packed)
            replace_module(model, name, module.to(device).train(model.training))
        for alias, target in self.same_as.items():
            device = next(model.get_submodule(target).buffers()).device
            replace_module(model, alias, QuantLinear(layers[target]).to(device).train(model.training))
        if set(shared) - used:
            raise ArtifactError(f"{self.file}: shared tensors no layer uses: {sorted(set(shared) - used)[:5]}")
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return False  # transformers would write another format: use rsavq_core's save_checkpoint

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the config and the quantizer with transformers (once)."""
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantization_config(QUANT_METHOD)(RsavqConfig)
        register_quantizer(QUANT_METHOD)(RsavqHfQuantizer)


# Imported before transformers' quantizers (directly, not through ``rsavq_core``'s hook), this
# module registers itself: the hook, firing while this module is half-loaded, leaves it to us.
register()
