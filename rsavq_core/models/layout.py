"""Where a model's decoder blocks and quantizable linears are: the one definition of "a decoder block".

Found structurally (the largest ``nn.ModuleList`` of blocks holding linears), not by attribute
names, so LLaMA, Mistral, Qwen2, Gemma, Phi and GPT-NeoX style models alike work. The pipeline,
the calibration statistics and the pre-flight memory estimate (on a skeleton of the model with no
weights) all ask this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from torch import nn

from rsavq_core.errors import UnsupportedModelError


@dataclass(frozen=True)
class DecoderLayout:
    """Where the decoder blocks of a model are, found structurally (no hard-coded names)."""

    blocks_path: str  # dotted path of the nn.ModuleList of decoder blocks, e.g. "model.layers"
    blocks: nn.ModuleList

    def linear_names(self, index: int) -> list[str]:
        """Names (relative to block ``index``) of its nn.Linear layers, in module order."""
        return [name for name, mod in self.blocks[index].named_modules() if isinstance(mod, nn.Linear)]


def find_decoder_layout(model: nn.Module) -> DecoderLayout:
    """The largest ``nn.ModuleList`` whose entries all hold ``nn.Linear`` layers: the decoder blocks.

    Works for LLaMA, Mistral, Qwen2, Gemma, Phi and GPT-NeoX style models alike because it relies
    on structure, not on attribute names.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if all(any(isinstance(m, nn.Linear) for m in block.modules()) for block in module):
            if best is None or len(module) > best[0]:
                best = (len(module), name, module)
    if best is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no list of decoder blocks containing nn.Linear layers; "
            "only models whose projections are nn.Linear can be quantized"
        )
    return DecoderLayout(blocks_path=best[1], blocks=best[2])


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(full name, module) of every nn.Linear inside the decoder blocks, block by block."""
    layout = find_decoder_layout(model)
    out: list[tuple[str, nn.Linear]] = []
    for i, block in enumerate(layout.blocks):
        for name, mod in block.named_modules():
            if isinstance(mod, nn.Linear):
                out.append((f"{layout.blocks_path}.{i}.{name}", mod))
    return out


def describe_linears(model: nn.Module) -> str:
    """One JSON line per distinct shape, for logs and errors."""
    shapes: dict[str, int] = {}
    for _, mod in quantizable_linears(model):
        key = f"{mod.out_features}x{mod.in_features}"
        shapes[key] = shapes.get(key, 0) + 1
    return json.dumps(shapes)


def linear_at(block: nn.Module, name: str) -> nn.Linear:
    """The ``nn.Linear`` named ``name`` inside ``block`` (``UnsupportedModelError`` if it is something else)."""
    module = block.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise UnsupportedModelError(f"{name} is a {type(module).__name__}, not an nn.Linear")
    return module


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (dotted, relative to ``root``) is."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
