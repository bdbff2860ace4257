"""An input embedding stored as row-wise scalar codes (``--embedding-bits``).

A lookup dequantizes only the rows of the tokens asked for: the table stays packed (at 4 bits an
eighth of its float32 size) and no float copy of it is made. Rows are gathered straight from the
packed word stream when a row fills whole 32-bit words (``embedding_dim * bits`` a multiple of
32, true of every hidden size a multiple of 32); otherwise the codes are unpacked once into a
uint8 table (a byte per weight, still half of float16).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kernels.packing import WORD_BITS, unpack_codes
from rsavq_core.errors import ConfigError
from rsavq_core.formats.base import QuantizedLayer
from rsavq_core.formats.registry import format_of
from rsavq_core.formats.scalar import ScalarLayer


class QuantEmbedding(nn.Module):
    """nn.Embedding's lookup over a ``ScalarLayer`` [num_embeddings, embedding_dim].

    Buffers: ``codes`` int32 words (the scalar format's stream), ``scales`` and ``zeros`` fp16
    [num_embeddings, groups]; ``embed_scale`` when the replaced embedding multiplied its lookups
    by one (Gemma's scaled embeddings). Lookups come out in the dtype the module was built or
    last cast to (``.to(dtype)``, ``.half()``).
    """

    def __init__(
        self,
        layer: QuantizedLayer,
        like: nn.Embedding,
        dtype: torch.dtype = torch.float32,
        packed: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(layer, ScalarLayer):
            raise ConfigError(f"an embedding is stored as scalar codes, not {layer.kind}")
        self.num_embeddings, self.embedding_dim = layer.out_features, layer.in_features
        self.padding_idx = like.padding_idx
        self.bits, self.group_size = layer.bits, layer.group_size
        self.format = format_of(layer)
        for name, tensor in self.format.buffers(layer, packed or {}).items():  # codes, scales, zeros
            self.register_buffer(name, tensor)
        self.register_buffer("embed_scale", _lookup_scale(like))
        # Empty, and cast with the module: it carries the dtype lookups come out in.
        self.register_buffer("out_dtype", torch.empty(0, dtype=dtype), persistent=False)
        self._unpacked: torch.Tensor | None = None

    def _tensor(self, name: str) -> torch.Tensor:
        """Buffer ``name`` (typed: a module attribute reads as Tensor | Module to a type checker)."""
        buffer = self._buffers[name]
        assert buffer is not None
        return buffer

    def to_layer(self) -> ScalarLayer:
        """The in-memory layer (unpacked codes) on the buffers' device."""
        spec = {"bits": self.bits, "group_size": self.group_size}
        buffers = {name: self._tensor(name) for name in ("codes", "scales", "zeros")}
        layer: ScalarLayer = self.format.from_buffers(spec, buffers, self.num_embeddings, self.embedding_dim, None)
        return layer

    def _row_codes(self, rows: torch.Tensor) -> torch.Tensor:
        """rows: [R] int64 token ids -> their codes [R, embedding_dim] (any integer dtype)."""
        n = self.embedding_dim
        if (n * self.bits) % WORD_BITS == 0:
            words = self._tensor("codes").view(self.num_embeddings, n * self.bits // WORD_BITS)[rows]
            return unpack_codes(words, self.bits, rows.numel() * n).view(-1, n)
        if self._unpacked is None:
            self._unpacked = self.to_layer().codes
        return self._unpacked[rows]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [...] int64 -> [..., embedding_dim] of the module's dtype."""
        rows = input_ids.reshape(-1)
        group = torch.arange(self.embedding_dim, device=rows.device) // self.group_size
        scales = self._tensor("scales")[rows][:, group].float()
        zeros = self._tensor("zeros")[rows][:, group].float()
        values = (self._row_codes(rows).float() - zeros) * scales
        out = values.to(self._tensor("out_dtype").dtype).view(*input_ids.shape, self.embedding_dim)
        scale = self._buffers["embed_scale"]
        return out if scale is None else out * scale.to(out.dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantEmbedding:
        self._unpacked = None  # moved or cast: unpack again where the buffers now are
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # torch leaves Module._apply unannotated
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}"


def _lookup_scale(like: nn.Embedding) -> torch.Tensor | None:
    """The factor ``like`` multiplies its lookups by (transformers' scaled embeddings, Gemma's
    √hidden: an ``embed_scale`` buffer, which a model built on the meta device has not set yet,
    and the ``scalar_embed_scale`` number it is set from), or None."""
    scale = getattr(like, "embed_scale", None)
    if isinstance(scale, torch.Tensor) and scale.device.type != "meta":
        return scale.detach().clone()
    number = getattr(like, "scalar_embed_scale", None)
    if isinstance(number, (int, float)):
        return torch.tensor(float(number))
    if scale is not None:
        raise ConfigError(f"{type(like).__name__} scales its lookups by a factor that is not known yet (meta)")
    return None
