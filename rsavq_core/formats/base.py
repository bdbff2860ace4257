"""What every packed layer format provides, and the helpers the formats share.

A format owns one kind of quantized layer end to end: its in-memory dataclass (with a pure-torch
``dequantize``, the reference), its tensors and manifest entry in the packed checkpoint, the
exact count of the bits it stores, the buffers ``QuantLinear`` keeps, and the kernels (if any)
that run it. Nothing outside ``rsavq_core.formats`` looks inside a layer of a given kind.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from kernels.packing import WORD_BITS, pack_codes, packed_words, unpack_codes
from rsavq_core.errors import ArtifactError, UnsupportedShapeError

FP16_BITS = 16
# Tensors several layers share (e.g. codebooks shared across blocks) are stored once, under names
# that start with this prefix, never under one layer's name.
SHARED_PREFIX = "rsavq_shared."


class QuantizedLayer(Protocol):
    """The interface every format's in-memory layer has."""

    kind: str  # the registered format's name
    out_features: int  # M
    in_features: int  # N
    bias: torch.Tensor | None  # [M] float16

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [M, N] of ``dtype`` (the reference every kernel is tested against)."""
        ...


@dataclass(frozen=True)
class BitCount:
    """Stored bits of one or more quantized weight matrices (conventions in ``rsavq_core.checkpoint.bitcount``)."""

    weights: int  # M * N summed over the counted matrices
    index_bits: int = 0
    codebook_bits: int = 0
    perm_bits: int = 0
    scale_bits: int = 0
    bias_bits: int = 0  # reported, excluded from total_bits
    padding_bits: int = 0
    outlier_bits: int = 0  # sparse fp16 outliers: positions and values

    @property
    def total_bits(self) -> int:
        """Every stored bit that represents the weights (bias excluded)."""
        side = self.codebook_bits + self.perm_bits + self.scale_bits + self.outlier_bits
        return self.index_bits + side + self.padding_bits

    @property
    def bpw(self) -> float:
        return self.total_bits / self.weights if self.weights else 0.0

    def __add__(self, other: BitCount) -> BitCount:
        if not isinstance(other, BitCount):
            return NotImplemented
        return BitCount(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)})

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total_bits": self.total_bits, "bpw": self.bpw}


def stream_bits(count: int, bits: int) -> tuple[int, int]:
    """(code bits, word-padding bits) of ``count`` codes of ``bits`` bits packed in int32 words."""
    code_bits = count * bits
    return code_bits, packed_words(count, bits) * WORD_BITS - code_bits


def packed_stream(packed: Mapping[str, torch.Tensor], key: str, codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The int32 word stream of ``codes`` (any shape, integer): ``packed[key]`` when the checkpoint
    reader already holds it (checked against the count), else packed now."""
    stream = packed.get(key)
    want = packed_words(codes.numel(), bits)
    if stream is None:
        return pack_codes(codes.detach(), bits)
    if stream.dtype != torch.int32 or stream.numel() != want:
        raise UnsupportedShapeError(f"packed {key} holds {stream.numel()} {stream.dtype} words, expected {want} int32")
    return stream.reshape(-1)


class LayerReader:
    """Validates one manifest entry against its tensors (popped from ``tensors``), for a format's ``read``."""

    def __init__(self, file: Path, name: str, entry: Any, tensors: dict[str, torch.Tensor]) -> None:
        self.where, self.name, self.tensors = f"{file}: layer {name}", name, tensors
        if not isinstance(entry, dict):
            raise ArtifactError(f"{self.where}: manifest entry must be an object")
        self.entry: dict[str, Any] = entry
        self.packed: dict[str, torch.Tensor] = {}  # QuantLinear buffer name -> int32 words as stored
        self.shared_used: set[str] = set()  # names of the shared tensors this layer uses

    def fail(self, field: str, message: str) -> ArtifactError:
        return ArtifactError(f"{self.where}: {field}: {message}")

    def int_(self, entry: Mapping[str, Any], key: str, low: int = 1) -> int:
        value = entry.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise self.fail(key, f"manifest value {value!r} is not an integer >= {low}")
        return value

    def take(self, field: str, shape: tuple[int, ...] | None, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
        key = f"{self.name}.{field}"
        if key not in self.tensors:
            raise self.fail(field, f"tensor {key} is missing")
        t = self.tensors.pop(key)
        if t.dtype not in dtypes:
            raise self.fail(field, f"dtype {t.dtype}, expected {' or '.join(map(str, dtypes))}")
        if shape is not None and tuple(t.shape) != shape:
            raise self.fail(field, f"shape {tuple(t.shape)}, expected {shape}")
        return t

    def shared(
        self, field: str, key: str, shape: tuple[int, ...] | None, dtypes: tuple[torch.dtype, ...]
    ) -> torch.Tensor:
        """The shared tensor named ``key`` (left in ``tensors``: other layers use it too), checked."""
        if not key.startswith(SHARED_PREFIX) or key not in self.tensors:
            raise self.fail(field, f"shared tensor {key} is missing")
        t = self.tensors[key]
        if t.dtype not in dtypes or (shape is not None and tuple(t.shape) != shape):
            raise self.fail(field, f"shared tensor {key} is {t.dtype} {tuple(t.shape)}, expected {dtypes[0]} {shape}")
        self.shared_used.add(key)
        return t

    def codes(self, field: str, count: int, bits: int) -> torch.Tensor:
        """[count] int64: the codes of ``bits`` bits in the int32 stream ``field`` (kept in ``packed``)."""
        if not 1 <= bits <= WORD_BITS:
            raise self.fail(field, f"code width {bits} bits is outside [1, {WORD_BITS}]")
        words = self.take(field, None, (torch.int32,))
        needed = packed_words(count, bits)
        if words.dim() != 1 or words.numel() != needed:
            raise self.fail(
                field,
                f"{words.numel()} packed words of shape {tuple(words.shape)}, expected "
                f"a 1-D stream of {needed} for {count} codes of {bits} bits",
            )
        self.packed[field.replace(".", "_")] = words
        return unpack_codes(words, bits, count)


class LayerFormat(ABC):
    """One packed layer format. Register an instance with ``rsavq_core.formats.register_format``."""

    kind: ClassVar[str]  # the name in the manifest and on every layer of this format

    # --- the packed checkpoint -------------------------------------------------------------------
    @abstractmethod
    def manifest(self, layer: Any) -> dict[str, Any]:
        """The format's fields of the layer's manifest entry (plain JSON)."""

    @abstractmethod
    def tensors(self, layer: Any) -> dict[str, torch.Tensor]:
        """The layer's stored tensors by field name (the file names them ``<layer>.<field>``), on the CPU."""

    @abstractmethod
    def read(self, reader: LayerReader, out_features: int, in_features: int, bias: torch.Tensor | None) -> Any:
        """The layer back from its manifest entry and tensors; ``reader.fail`` for every inconsistency."""

    def shared_tensors(self, layer: Any) -> dict[str, torch.Tensor]:
        """Tensors the layer shares with others, by their full names in the file (``SHARED_PREFIX``),
        on the CPU; stored once however many layers use them (default: none)."""
        return {}

    # --- accounting ------------------------------------------------------------------------------
    @abstractmethod
    def stored_bits(self, layer: Any) -> BitCount:
        """Exactly the bits ``tensors`` stores for the weight (bias in ``bias_bits``); the shared
        tensors are counted once per model, by ``bitcount.model_bits``, not here."""

    # --- fine-tuning (codes fixed, continuous parameters trained) ----------------------------------
    def tunable(self, layer: Any) -> dict[str, torch.Tensor]:
        """The layer's continuous tensors fine-tuning may change, as float32 copies (default: none)."""
        return {}

    def shared_tunable(self, layer: Any) -> dict[str, tuple[str, torch.Tensor]]:
        """The continuous tensors the layer shares with other layers, which only a fine-tuning that
        sees all of them (end to end) may change: name as in ``tunable`` -> (shared key, float32
        copy). Passed to ``dequantize_with`` / ``with_tuned`` under that name (default: none)."""
        return {}

    def dequantize_with(self, layer: Any, tunable: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The dense weight [M, N] float32 with ``tunable`` in place of the layer's own (differentiable)."""
        raise NotImplementedError(f"format {self.kind} cannot be fine-tuned")

    def with_tuned(self, layer: Any, tunable: Mapping[str, torch.Tensor]) -> Any:
        """A copy of the layer holding ``tunable``, rounded to how the format stores them."""
        raise NotImplementedError(f"format {self.kind} cannot be fine-tuned")

    # --- runtime (QuantLinear) -------------------------------------------------------------------
    @abstractmethod
    def spec(self, layer: Any) -> dict[str, Any]:
        """What ``QuantLinear`` keeps besides tensors (code widths, group bounds...), plain values."""

    @abstractmethod
    def buffers(self, layer: Any, packed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The module's buffers (bias excluded); ``packed`` may hold word streams already packed."""

    @abstractmethod
    def from_buffers(
        self,
        spec: dict[str, Any],
        buffers: Mapping[str, torch.Tensor],
        out_features: int,
        in_features: int,
        bias: torch.Tensor | None,
    ) -> Any:
        """The in-memory layer from ``QuantLinear``'s buffers (on their device)."""

    def kernel_ready(self, spec: dict[str, Any]) -> bool:
        """Whether the format's Triton kernels can run this layer (default: the format has none)."""
        return False

    def kernel_layout(self, module: Any) -> Any:
        """The kernels' form of a ``QuantLinear``'s layer on its buffers' device (built once per device)."""
        raise NotImplementedError(f"format {self.kind} has no kernels")

    def kernel_gemv(self, x: torch.Tensor, layout: Any) -> torch.Tensor:
        """x: [B, N] -> [B, M] + bias, fused (decode)."""
        raise NotImplementedError(f"format {self.kind} has no kernels")

    def kernel_dequantize(self, layout: Any, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight [M, N] of ``dtype`` (prefill, then the vendor GEMM)."""
        raise NotImplementedError(f"format {self.kind} has no kernels")
