"""A model that stays on disk: a weightless skeleton whose blocks are read in when their turn comes.

The skeleton is the transformers model built from its ``config.json`` with every parameter on the
meta device (buffers stay real: rotary frequencies are computed, not stored). The embeddings,
final norm and head are read once (``load_rest``); a decoder block's parameters are read from the
safetensors files by ``block(i)`` and its linear weights dropped again on the way out, so host
memory holds one block of weights at a time whatever the model's size. The norms a block keeps
are a few kilobytes, and they are what the packed checkpoint stores besides the packed layers.

A parameter is found in the files under its own state-dict name (or a tied alias's), or the name
transformers renames it from on load (``models.renames``); checkpoints whose tensors transformers
converts on load (per-expert matrices it stacks) are refused here, and such a model is loaded whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rsavq_core.errors import UnsupportedModelError
from rsavq_core.models.layout import DecoderLayout, find_decoder_layout
from rsavq_core.models.renames import names_on_load
from rsavq_core.models.weights import WeightFiles


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within the block, every parameter a module registers is moved to the meta device (its
    ``torch.empty`` storage is freed at once, and initialisers on it cost nothing); buffers are
    left alone, so non-persistent ones (rotary inverse frequencies) keep their computed values."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


class StreamedModel:
    """The skeleton of the model in ``folder`` and the files its parameters are read from."""

    def __init__(self, folder: Path, *, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        self.folder, self.device, self.dtype = Path(folder), device, dtype
        self.files = WeightFiles.open(self.folder)
        try:
            config = AutoConfig.from_pretrained(str(self.folder))
            with parameters_on_meta():
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise UnsupportedModelError(f"{self.folder}: cannot build the model from its config.json: {exc}") from exc
        if (self.folder / "generation_config.json").is_file():
            hf: Any = model
            hf.generation_config = GenerationConfig.from_pretrained(str(self.folder))
        model.eval()
        for module in model.modules():  # buffers (small) live on the compute device
            for key, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[key] = buffer.to(device)
        self.model = model
        self.layout: DecoderLayout = find_decoder_layout(model)
        self._groups = _tied_groups(model)
        self._group_of = {name: names for names in self._groups for name in names}
        self._file_name = self._find_in_files()

    def _find_in_files(self) -> dict[str, str]:
        """Parameter name -> the file tensor holding it (a tied parameter may be stored under any
        of its names); ``UnsupportedModelError`` listing what the files lack."""
        on_load, converted = names_on_load(self.model, self.files.entries)
        if converted:
            raise UnsupportedModelError(
                f"{self.folder}: cannot stream this checkpoint: transformers converts {len(converted)} of its "
                f"tensors on load, not one by one (e.g. {', '.join(converted[:2])}); load it whole instead"
            )
        found: dict[str, str] = {}
        missing: list[str] = []
        for names in self._groups:
            stored = next((on_load[n] for n in names if n in on_load), None)
            if stored is None:
                missing.append(names[0])
            found.update({n: stored for n in names if stored is not None})
        if missing:
            raise UnsupportedModelError(
                f"{self.folder}: cannot stream this checkpoint: {len(missing)} parameters are not stored under "
                f"their own names ({', '.join(missing[:4])}); load it whole instead"
            )
        return found

    def _set(self, names: list[str], value: nn.Parameter) -> None:
        for name in names:
            owner, _, attr = name.rpartition(".")
            module = self.model.get_submodule(owner) if owner else self.model
            module._parameters[attr] = value

    def load(self, prefix: str = "", *, exclude: tuple[str, ...] = ()) -> None:
        """Read every parameter whose name starts with ``prefix`` (and with none of ``exclude``)."""
        for names in self._groups:
            first = names[0]
            if not any(n.startswith(prefix) and not (exclude and n.startswith(exclude)) for n in names):
                continue
            current = self.model.get_parameter(first)
            if current.device.type != "meta":
                continue
            tensor = self.files.read(self._file_name[first], self.dtype, self.device)
            if tuple(tensor.shape) != tuple(current.shape):
                raise UnsupportedModelError(
                    f"{self._file_name[first]}: stored shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(current.shape)}"
                )
            self._set(names, nn.Parameter(tensor, requires_grad=current.requires_grad))

    def load_rest(self) -> None:
        """Read what lies outside the decoder blocks (embeddings, final norm, head)."""
        self.load(exclude=(self.layout.blocks_path + ".",))

    def drop(self, names: list[str]) -> None:
        """Put the named parameters (and their tied aliases) back on the meta device."""
        for full in names:
            param = self.model.get_parameter(full)
            if param.device.type != "meta":
                meta = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
                self._set(self._group_of.get(full, [full]), meta)

    @contextlib.contextmanager
    def resident(self, head: bool = True) -> Iterator[nn.Module]:
        """The model with what lies outside the blocks read in, for the passes that run the model's
        own forward (recording the blocks' inputs, the head's gradient); dropped again on the way
        out, so that an 8B model's 4 GB of embeddings and head do not sit beside the block loop.
        ``head=False`` leaves the output embeddings unread (unless tied to the input ones): a pass
        that stops inside the blocks never reaches them (2.1 GB in float32 for Llama-3-8B)."""
        outside = self.layout.blocks_path + "."
        names = [names[0] for names in self._groups if not names[0].startswith(outside)]
        loaded_before = {n for n in names if self.model.get_parameter(n).device.type != "meta"}
        self.load(exclude=(outside, *([] if head else self._output_embedding_prefixes())))
        try:
            yield self.model
        finally:
            self.drop([n for n in names if n not in loaded_before])

    def _output_embedding_prefixes(self) -> list[str]:
        """Name prefixes of the output embeddings' parameters ([] when the model has none)."""
        head = self.model.get_output_embeddings()
        return [f"{name}." for name, module in self.model.named_modules() if module is head and head is not None]

    @property
    def vocab_size(self) -> int:
        """Rows of the output head (its shape is known on the meta device too)."""
        head = self.model.get_output_embeddings()
        if head is None:
            raise UnsupportedModelError(f"{self.folder}: the model has no output head to compute a loss with")
        return int(head.weight.shape[0])

    def block_prefix(self, index: int) -> str:
        return f"{self.layout.blocks_path}.{index}."

    def load_block_state(self, index: int, skip: list[str]) -> None:
        """Read block ``index``'s parameters outside the submodules named in ``skip`` (its norms, when
        its quantized linears come from an earlier run's checkpoint and the block is not run)."""
        prefix = self.block_prefix(index)
        self.load(prefix, exclude=tuple(f"{prefix}{name}." for name in skip))

    @contextlib.contextmanager
    def block(self, index: int, drop: list[str] | None = None) -> Iterator[nn.Module]:
        """Block ``index`` with its parameters read in; on the way out the parameters of the
        submodules named in ``drop`` (relative names: the linears that were quantized) go back to
        the meta device. ``None`` drops every linear of the block."""
        prefix = self.block_prefix(index)
        self.load(prefix)
        block = self.layout.blocks[index]
        try:
            yield block
        finally:
            names = drop if drop is not None else [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
            for name in names:
                module = block.get_submodule(name)
                self.drop([f"{prefix}{name}.{key}" for key, p in module._parameters.items() if p is not None])

    def materialized_bytes(self) -> int:
        """Bytes of the parameters read in now (for tests and progress reports)."""
        seen = {id(p): p for p in self.model.parameters() if p.device.type != "meta"}
        return sum(p.numel() * p.element_size() for p in seen.values())


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """The names of each parameter (a tied embedding has two), in model order."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return list(groups.values())
