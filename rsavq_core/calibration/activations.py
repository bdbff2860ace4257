"""The hidden states at a block boundary, for every calibration micro-batch: in host memory up to
a budget, on disk past it.

Streaming statistics keep one list of [B, T, D] tensors per block boundary: every boundary at once
when gradients flow back down the blocks, two at a time otherwise. For a 8B model and 128 windows
of 2048 tokens that is 4 GiB per boundary, 132 GiB for all of them: more than a worker's memory,
so what exceeds ``budget_bytes`` goes to files in ``offload_dir`` (one per boundary, removed when
the boundary is dropped) and is read back when that boundary's turn comes.

The default budget is two boundaries (``models.memory.boundary_budget``): what a pass holds anyway (a block's
inputs and its outputs), so memory does not grow with depth; a Hessian-only run never spills, and
a gradient run writes each boundary once and reads it back once. When a new boundary does not fit,
the held boundaries with the lowest keys go to disk first: the backward pass reads them last.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch

from rsavq_core.errors import ConfigError
from rsavq_core.models.memory import GIB


def default_offload_root() -> Path:
    """Where activations spill when no offload directory is set: the system's temp directory."""
    return Path(tempfile.gettempdir()) / "rsavq-offload"


def check_offload_dir(folder: Path, needed_bytes: float) -> None:
    """``ConfigError`` unless ``folder`` is (or can be made) a writable directory with
    ``needed_bytes`` free: a run that would spill learns it before any heavy work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(f"offload directory {folder} is not writable: {exc}") from exc
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise ConfigError(
            f"offload directory {folder} has {free / GIB:.2f} GiB free; this run may spill "
            f"{needed_bytes / GIB:.2f} GiB of activations there"
        )


class ActivationStore:
    """Per boundary (an int), a list of tensors; host memory up to ``budget_bytes``, then files."""

    def __init__(self, budget_bytes: float, offload_dir: Path | None, device: torch.device) -> None:
        self.budget, self.device = budget_bytes, device
        self._root = offload_dir
        self._folder: Path | None = None
        self._held: dict[int, list[torch.Tensor]] = {}
        self._spilled: dict[int, _Spilled] = {}
        self.held_bytes = 0
        self.spilled_bytes = 0  # written to disk in all, for reports

    def put(self, key: int, tensors: list[torch.Tensor]) -> None:
        """Keep ``tensors`` (per micro-batch [B, T, D] floating) under ``key``, replacing what was there."""
        self.drop(key)
        size = _size(tensors)
        older = sorted(k for k in self._held if k < key)
        # make room by spilling the boundaries read last, unless ``tensors`` would not fit anyway
        while older and size <= self.budget < self.held_bytes + size:
            lowest = older.pop(0)
            evicted = self._held.pop(lowest)
            self.held_bytes -= _size(evicted)
            self._spill(lowest, evicted)
        if self.held_bytes + size <= self.budget:
            self._held[key] = [t.detach().to("cpu") for t in tensors]
            self.held_bytes += size
        else:
            self._spill(key, tensors)

    def _spill(self, key: int, tensors: list[torch.Tensor]) -> None:
        # raw bytes, tensor after tensor, from the tensors' own memory: a serializer that builds the
        # file in memory first would briefly double a boundary (4 GiB for an 8B model's)
        file = self._spill_folder() / f"boundary_{key:05d}.bin"
        with file.open("wb") as sink:
            for tensor in tensors:
                tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tofile(sink)
        self._spilled[key] = _Spilled(file, [(t.shape, t.dtype) for t in tensors])
        self.spilled_bytes += _size(tensors)

    def get(self, key: int) -> list[torch.Tensor]:
        """The tensors under ``key``, on the compute device."""
        if key in self._held:
            return [t.to(self.device) for t in self._held[key]]
        if key in self._spilled:
            return [t.to(self.device) for t in self._spilled[key].read()]
        raise KeyError(f"no activations stored for boundary {key}")

    def drop(self, key: int) -> None:
        held = self._held.pop(key, None)
        if held is not None:
            self.held_bytes -= _size(held)
        spilled = self._spilled.pop(key, None)
        if spilled is not None:
            spilled.file.unlink(missing_ok=True)

    def close(self) -> None:
        """Drop everything and remove this store's spill folder."""
        for key in list(self._held) + list(self._spilled):
            self.drop(key)
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def _spill_folder(self) -> Path:
        if self._folder is None:
            root = self._root if self._root is not None else default_offload_root()
            self._folder = root / f"activations-{uuid.uuid4().hex[:12]}"
            self._folder.mkdir(parents=True, exist_ok=True)
        return self._folder


@dataclass(frozen=True)
class _Spilled:
    file: Path
    layout: list[tuple[torch.Size, torch.dtype]]  # each tensor's shape and dtype, in file order

    def read(self) -> list[torch.Tensor]:
        tensors = []
        with self.file.open("rb") as source:
            for shape, dtype in self.layout:
                count = math.prod(shape) * dtype.itemsize
                raw = torch.from_numpy(numpy.fromfile(source, dtype=numpy.uint8, count=count))
                tensors.append(raw.view(dtype).reshape(shape))
        return tensors


def _size(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
