"""A canonical safetensors file written tensor by tensor: memory for one tensor, not the file.

``canonical.save_canonical`` hands ``safetensors`` a dict of every tensor at once, which for a
packed 70B checkpoint means every packed layer in memory. This writer takes, per tensor, its
dtype, shape and a way to produce its bytes (an in-memory tensor, or a byte range of another
safetensors file such as a finished layer's checkpoint), and writes the very bytes
``save_canonical`` would: the data in safetensors' own order (asked of safetensors itself, on
one-element stand-ins, so a future ordering rule is followed too), the header canonical (keys
sorted, compact JSON, space-padded to 8 bytes). ``tests/core/test_checkpoint_writer.py`` holds the
two to the same sha256.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import torch
from safetensors.torch import save as save_bytes

from rsavq_core.atomic import replacing
from rsavq_core.errors import ArtifactError
from rsavq_core.models.weights import TORCH_DTYPES, header_and_start, stored_bytes

_LEN = struct.Struct("<Q")
TORCH_TO_SAFETENSORS = {v: k for k, v in TORCH_DTYPES.items()}
_CHUNK = 16 << 20


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: its safetensors dtype name, shape, and a writer of its raw bytes."""

    dtype: str
    shape: tuple[int, ...]
    write: Callable[[BinaryIO], None]

    @property
    def nbytes(self) -> int:
        return stored_bytes(self.dtype, self.shape)


def tensor_spec(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> TensorSpec:
    """The spec of an in-memory tensor (any device), stored as ``dtype`` (default: its own),
    converted only when it is written."""
    stored = dtype or tensor.dtype
    if stored not in TORCH_TO_SAFETENSORS:
        raise ArtifactError(f"cannot store a tensor of dtype {stored}")

    def write(fh: BinaryIO) -> None:
        host = tensor.detach().to("cpu", stored).contiguous()
        if host.numel():
            fh.write(host.reshape(-1).view(torch.uint8).numpy().tobytes())

    return TensorSpec(TORCH_TO_SAFETENSORS[stored], tuple(tensor.shape), write)


def file_specs(file: Path) -> dict[str, TensorSpec]:
    """Specs of the tensors in a safetensors ``file``, each written by copying its byte range:
    nothing is decoded and one chunk at a time is in memory."""
    data_start, header = header_and_start(file)
    specs = {}
    for name, info in header.items():
        begin, end = (int(v) for v in cast(list[int], info["data_offsets"]))
        shape = tuple(int(s) for s in cast(list[int], info["shape"]))
        specs[name] = TensorSpec(str(info["dtype"]), shape, _copier(file, data_start + begin, end - begin))
    return specs


def _copier(file: Path, start: int, size: int) -> Callable[[BinaryIO], None]:
    def write(fh: BinaryIO) -> None:
        with open(file, "rb") as src:
            src.seek(start)
            left = size
            while left:
                chunk = src.read(min(left, _CHUNK))
                if not chunk:
                    raise ArtifactError(f"{file}: truncated (a tensor's bytes end early)")
                fh.write(chunk)
                left -= len(chunk)

    return write


def safetensors_order(specs: dict[str, TensorSpec]) -> list[str]:
    """The order safetensors lays these tensors out in, asked of safetensors on stand-ins of one
    element each (the order depends on names and dtypes only)."""
    stand_ins = {name: torch.zeros(1, dtype=TORCH_DTYPES[spec.dtype]) for name, spec in specs.items()}
    raw = save_bytes(stand_ins)
    (length,) = _LEN.unpack(raw[: _LEN.size])
    header = json.loads(raw[_LEN.size : _LEN.size + length])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda name: int(header[name]["data_offsets"][0]))


def write_canonical(specs: dict[str, TensorSpec], file: Path, metadata: dict[str, str] | None) -> None:
    """Write ``specs`` to ``file`` (atomically) as ``canonical.save_canonical`` would write the same
    tensors (safetensors writes an empty ``__metadata__`` for ``{}`` and none for ``None``)."""
    order = safetensors_order(specs)
    header: dict[str, object] = {"__metadata__": metadata} if metadata is not None else {}
    offset = 0
    for name in order:
        spec = specs[name]
        header[name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with replacing(file) as tmp, open(tmp, "wb") as fh:
        fh.write(_LEN.pack(len(text)))
        fh.write(text)
        for name in order:
            start = fh.tell()
            specs[name].write(fh)
            if fh.tell() - start != specs[name].nbytes:
                raise ArtifactError(
                    f"{name}: wrote {fh.tell() - start} bytes, its shape and dtype need {specs[name].nbytes}"
                )
