"""A checkpoint's safetensors files as one table of tensors, read one tensor at a time.

Streaming a model bigger than memory needs each block's weights when its turn comes and no
sooner. This module maps every tensor name to the file holding it (one file, or shards named by
``model.safetensors.index.json``), checks that table before any heavy work (a shard the index
names but the folder lacks, an index naming a tensor its shard does not hold), and reads single
tensors with plain reads: a read costs that tensor's bytes, not the file's.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from rsavq_core.errors import ModelResolutionError

INDEX_FILE = "model.safetensors.index.json"
# safetensors' dtype names -> torch dtypes (the ones a checkpoint of ours, or a model's, holds)
TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def stored_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of safetensors dtype ``dtype`` and ``shape`` (as laid out in a file)."""
    if dtype not in TORCH_DTYPES:
        raise ModelResolutionError(f"a tensor of dtype {dtype}, which rsavq does not read")
    return math.prod(shape) * TORCH_DTYPES[dtype].itemsize


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str  # safetensors' name: "BF16", "F32", ...
    shape: tuple[int, ...]
    start: int = 0  # absolute offset of its bytes in the file

    @property
    def nbytes(self) -> int:
        return stored_bytes(self.dtype, self.shape)


def read_header(file: Path) -> dict[str, dict[str, object]]:
    """The JSON header of one safetensors file (tensor name -> dtype, shape, offsets), no data read."""
    return header_and_start(file)[1]


def header_and_start(file: Path) -> tuple[int, dict[str, dict[str, object]]]:
    """(where the data starts in ``file``, its header without ``__metadata__``)."""
    try:
        with open(file, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header: dict[str, dict[str, object]] = json.loads(fh.read(length))
    except (OSError, struct.error, ValueError) as exc:
        raise ModelResolutionError(f"{file}: not a readable safetensors file: {exc}") from exc
    header.pop("__metadata__", None)
    return 8 + length, header


@dataclass
class WeightFiles:
    """Every tensor of a checkpoint folder: name -> where it is (``open`` builds and checks it)."""

    folder: Path
    entries: dict[str, TensorEntry]

    @classmethod
    def open(cls, folder: Path) -> WeightFiles:
        """The table of ``folder``'s safetensors weights; ``ModelResolutionError`` naming the problem
        when a shard is missing, the index names a tensor its shard lacks, or there are no weights."""
        folder = Path(folder)
        index = folder / INDEX_FILE
        if index.is_file():
            wanted = _index_map(index)
            files = sorted(set(wanted.values()))
        else:
            wanted = {}
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise ModelResolutionError(f"{folder}: no safetensors weights (streaming reads only safetensors)")
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise ModelResolutionError(f"{folder}: {INDEX_FILE} names shards that are not there: {missing[:5]}")
        entries: dict[str, TensorEntry] = {}
        for name in files:
            data_start, header = header_and_start(folder / name)
            for tensor, info in header.items():
                shape, dtype, offsets = info.get("shape"), info.get("dtype"), info.get("data_offsets")
                if not isinstance(shape, list) or not isinstance(dtype, str) or not isinstance(offsets, list):
                    raise ModelResolutionError(f"{folder / name}: malformed header entry for {tensor!r}")
                start = data_start + int(offsets[0])
                entries[tensor] = TensorEntry(folder / name, dtype, tuple(int(s) for s in shape), start)
        absent = [t for t, file in wanted.items() if t not in entries or entries[t].file.name != file]
        if absent:
            raise ModelResolutionError(
                f"{folder}: {INDEX_FILE} names tensors its shards do not hold: {sorted(absent)[:5]}"
            )
        return cls(folder, entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def read(self, name: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """Tensor ``name`` as ``dtype`` on ``device``.

        Read with plain file reads, not through a memory map: pages of a mapped file count in the
        process's resident memory for as long as the map lives, which for a streamed 8B model would
        grow to the whole checkpoint; read pages go to the page cache, which the kernel reclaims."""
        entry = self.entries.get(name)
        if entry is None:
            raise ModelResolutionError(f"{self.folder}: no tensor {name!r} in the checkpoint's safetensors files")
        stored = TORCH_DTYPES.get(entry.dtype)
        if stored is None:
            raise ModelResolutionError(f"{entry.file}: {name!r} has dtype {entry.dtype}, which cannot be streamed")
        buffer = bytearray(entry.nbytes)
        try:
            with open(entry.file, "rb") as fh:
                fh.seek(entry.start)
                if fh.readinto(buffer) != entry.nbytes:
                    raise ModelResolutionError(f"{entry.file}: truncated (the bytes of {name!r} end early)")
        except OSError as exc:
            raise ModelResolutionError(f"{entry.file}: cannot read {name!r}: {exc}") from exc
        if not entry.nbytes:
            return torch.empty(entry.shape, dtype=dtype, device=device)
        tensor = torch.frombuffer(buffer, dtype=stored).reshape(entry.shape)
        return tensor.to(device=device, dtype=dtype, copy=True)


def _index_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelResolutionError(f"{index}: not a safetensors index (no weight_map): {exc}") from exc
    if not isinstance(weight_map, dict):
        raise ModelResolutionError(f"{index}: weight_map is not a mapping")
    return {str(k): str(v) for k, v in weight_map.items()}
