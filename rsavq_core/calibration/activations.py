"""The hidden states at a block boundary, for every calibration micro-batch: in host memory up to
a budget, on disk past it.

Streaming statistics keep one list of [B, T, D] tensors per block boundary: every boundary at once
when gradients flow back down the blocks, two at a time otherwise. For a 8B model and 128 windows
of 2048 tokens that is 4 GiB per boundary, 132 GiB for all of them: more than a worker's memory,
so what exceeds ``budget_bytes`` goes to files in ``offload_dir`` (one per boundary, removed when
the boundary is dropped) and is read back when that boundary's turn comes.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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
        self._spilled: dict[int, Path] = {}
        self.held_bytes = 0
        self.spilled_bytes = 0

    def put(self, key: int, tensors: list[torch.Tensor]) -> None:
        """Keep ``tensors`` (per micro-batch [B, T, D] floating) under ``key``, replacing what was there."""
        self.drop(key)
        size = sum(t.numel() * t.element_size() for t in tensors)
        if self.held_bytes + size <= self.budget:
            self._held[key] = [t.detach().to("cpu") for t in tensors]
            self.held_bytes += size
            return
        file = self._spill_folder() / f"boundary_{key:05d}.safetensors"
        save_file({str(i): t.detach().to("cpu").contiguous() for i, t in enumerate(tensors)}, str(file))
        self._spilled[key] = file
        self.spilled_bytes += size

    def get(self, key: int) -> list[torch.Tensor]:
        """The tensors under ``key``, on the compute device."""
        if key in self._held:
            return [t.to(self.device) for t in self._held[key]]
        if key in self._spilled:
            raw = load_file(str(self._spilled[key]))
            return [raw[str(i)].to(self.device) for i in range(len(raw))]
        raise KeyError(f"no activations stored for boundary {key}")

    def drop(self, key: int) -> None:
        held = self._held.pop(key, None)
        if held is not None:
            self.held_bytes -= sum(t.numel() * t.element_size() for t in held)
        file = self._spilled.pop(key, None)
        if file is not None:
            file.unlink(missing_ok=True)

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
