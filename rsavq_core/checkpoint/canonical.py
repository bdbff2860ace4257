"""safetensors files whose bytes depend only on their content.

``safetensors`` serialises the metadata from a Rust ``HashMap``, so two processes that save the same
tensors and metadata write the metadata keys in different orders and the files' sha256 differ. A
job service publishes the sha256 of its artifacts and promises that a resumed job yields the same
artifact as an uninterrupted one, so every file we publish is rewritten with a canonical header:
keys sorted, compact JSON, space-padded to 8 bytes (the format's alignment rule).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from rsavq_core.atomic import replacing
from rsavq_core.errors import ArtifactError

_LEN = struct.Struct("<Q")


def canonicalize(file: Path) -> None:
    """Rewrite ``file``'s header canonically, in place (via a sibling temp file and a rename)."""
    with open(file, "rb") as src:
        raw = src.read(_LEN.size)
        if len(raw) != _LEN.size:
            raise ArtifactError(f"{file}: too short to be a safetensors file")
        (length,) = _LEN.unpack(raw)
        try:
            header = json.loads(src.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{file}: header is not JSON: {exc}") from exc
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # data offsets are relative to the data start: padding is free
        with replacing(file) as tmp, open(tmp, "wb") as dst:
            dst.write(_LEN.pack(len(text)))
            dst.write(text)
            shutil.copyfileobj(src, dst, length=16 << 20)


def save_canonical(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` followed by ``canonicalize``. tensors: any dtypes, contiguous."""
    save_file(tensors, str(file), metadata=metadata)
    canonicalize(file)
