"""A packed checkpoint's layers: each layer's manifest entry and tensors, written and read back.

The manifest (``layers`` in the file's metadata) has one entry per layer name: ``{"kind",
"out_features", "in_features", "has_bias"}`` plus its format's fields, or ``{"same_as": name}``
for a layer object that serves under a second name (a quantized embedding and the head tied to
it), stored once. ``rsavq_core.checkpoint.packed`` writes and reads the file around them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from rsavq_core.checkpoint.writer import TensorSpec, file_specs, tensor_spec
from rsavq_core.errors import ArtifactError, ConfigError, UnsupportedShapeError
from rsavq_core.formats.base import SHARED_PREFIX, LayerReader, QuantizedLayer
from rsavq_core.formats.registry import format_of, get_format

SAME_AS = "same_as"  # a layer's manifest entry naming the layer it shares every tensor with


def manifest_entry(layer: QuantizedLayer) -> dict[str, Any]:
    common = {
        "kind": layer.kind,
        "out_features": layer.out_features,
        "in_features": layer.in_features,
        "has_bias": layer.bias is not None,
    }
    return {**common, **format_of(layer).manifest(layer)}


def layer_tensors(name: str, layer: QuantizedLayer) -> dict[str, torch.Tensor]:
    """The packed tensors of one layer, keyed by their names in the file; with the shared tensors it
    uses (``SHARED_PREFIX``), which a checkpoint of several layers stores once."""
    try:
        fields = format_of(layer).tensors(layer)
    except UnsupportedShapeError as exc:
        raise UnsupportedShapeError(f"layer {name}: {exc}") from exc
    out = {f"{name}.{field}": tensor for field, tensor in fields.items()}
    out.update(format_of(layer).shared_tensors(layer))
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach().to("cpu", torch.float16).contiguous()
    return out


@runtime_checkable
class LayersOnDisk(Protocol):
    """Finished layers kept in files (``pipeline.resume.CheckpointedLayers``): the checkpoint copies
    their packed tensors from there instead of packing them in memory."""

    def on_disk(self, name: str) -> bool: ...

    def file(self, name: str) -> Path: ...

    def entry(self, name: str) -> dict[str, Any]: ...


def layer_aliases(layers: Mapping[str, QuantizedLayer]) -> dict[str, str]:
    """{name: the earlier name} of each layer that is the very object of an earlier one (a head
    tied to a quantized embedding). Layers kept on disk are distinct files, so only those held in
    memory are compared (objects that stay alive while compared: ids of layers read from disk and
    dropped could be reused)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name in layers:
        if isinstance(layers, LayersOnDisk) and layers.on_disk(name):
            continue
        key = id(layers[name])
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def layer_specs(layers: Mapping[str, QuantizedLayer]) -> tuple[dict[str, TensorSpec], dict[str, Any]]:
    """The packed tensors of every layer (shared ones once) and the manifest. A layer object that
    serves under two names (an embedding and the head tied to it) is stored under the first; the
    second's manifest entry is ``{"same_as": first}``."""
    specs: dict[str, TensorSpec] = {}
    shared: dict[str, torch.Tensor] = {}
    manifest: dict[str, Any] = {}
    aliases = layer_aliases(layers)
    for name in layers:
        if isinstance(layers, LayersOnDisk) and layers.on_disk(name):  # the file holds layer_tensors(name, layer)
            manifest[name] = layers.entry(name)
            specs.update({k: v for k, v in file_specs(layers.file(name)).items() if k not in specs})
            continue
        if name in aliases:
            manifest[name] = {SAME_AS: aliases[name]}
            continue
        layer = layers[name]
        manifest[name] = manifest_entry(layer)
        for key, tensor in layer_tensors(name, layer).items():
            if key in shared and not torch.equal(shared[key], tensor):
                raise ConfigError(f"layer {name} holds other values for the shared tensor {key} than an earlier layer")
            if key.startswith(SHARED_PREFIX):
                shared[key] = tensor
            specs[key] = tensor_spec(tensor)
    return specs, manifest


def split_aliases(file: Path, manifest: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(the entries of the stored layers, {alias: the stored layer it is}) of a manifest; an alias
    of a layer that is not stored is an ``ArtifactError``."""
    aliases = {name: e[SAME_AS] for name, e in manifest.items() if isinstance(e, dict) and SAME_AS in e}
    stored = {name: entry for name, entry in manifest.items() if name not in aliases}
    for alias, target in aliases.items():
        if target not in stored:
            raise ArtifactError(f"{file}: layer {alias} is the same as {target!r}, which is not stored")
    return stored, aliases


def read_layers(
    file: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, QuantizedLayer], dict[str, LayerReader]]:
    """Every layer of the manifest (a ``same_as`` entry: the very object of the layer it names),
    and the reader of each stored one."""
    stored, aliases = split_aliases(file, manifest)
    readers = {name: LayerReader(file, name, entry, tensors) for name, entry in stored.items()}
    layers = {name: read_layer(reader) for name, reader in readers.items()}
    layers.update({alias: layers[target] for alias, target in aliases.items()})
    return layers, readers


def read_layer(reader: LayerReader) -> QuantizedLayer:
    """One layer from its manifest entry: the shared fields here, the rest by its format."""
    e = reader.entry
    m, n = reader.int_(e, "out_features"), reader.int_(e, "in_features")
    bias = reader.take("bias", (m,), (torch.float16,)) if e.get("has_bias") else None
    try:
        layer_format = get_format(e.get("kind"))
    except ArtifactError as exc:
        raise reader.fail("kind", str(exc)) from None
    layer: QuantizedLayer = layer_format.read(reader, m, n, bias)
    return layer
