"""Where a run computes and how it holds the model: the device, streaming, the activation budget.

One object, built from the settings (``RSAVQ_DEVICE``, ``RSAVQ_STREAM``, ``RSAVQ_OFFLOAD_DIR``,
``RSAVQ_ACTIVATION_MEMORY_GB``, ``RSAVQ_COMPUTE_DTYPE``) or from ``--device`` / ``--stream`` /
``--offload-dir`` / ``--compute-dtype``, and checked before any heavy work: a device that is not
there is a ``ConfigError`` naming it.

Compute dtypes: ``rsavq_core/precision.py`` says, in one place, what runs in which precision
(bf16 calibration forwards on a GPU by default, float32 accumulators, float32 quantizer, float64
factorizations).

Reproducibility: on the CPU a run is deterministic (the tests compare sha256). On CUDA, matmul
reductions may differ between GPU models and cuBLAS versions; a run repeats on the same device
kind when ``torch.use_deterministic_algorithms`` is left as torch sets it, but it is not
bit-identical to the CPU run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.errors import ConfigError
from rsavq_core.models.memory import GIB
from rsavq_core.precision import resolve_compute_dtype
from rsavq_core.settings import get_settings


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when present, else cpu; ``cpu``; ``cuda`` / ``cuda:N`` only when that device exists."""
    text = (name or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r} is not a device name (cpu, cuda, cuda:N, auto)") from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"device {name!r}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r}: no CUDA device is visible to this process (torch.cuda.is_available() is False)"
        )
    index = device.index or 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@dataclass(frozen=True)
class Placement:
    """How one run holds and computes the model."""

    device: torch.device = torch.device("cpu")
    stream: bool | None = None  # None: stream whenever the run and the checkpoint allow it
    offload_dir: Path | None = None  # where activations past the budget spill (None: a temp dir)
    compute_dtype: str = "float32"  # of the calibration forwards; "auto" resolves here (``rsavq_core.precision``)
    activation_budget_bytes: float | None = None  # None: two block boundaries (``memory.boundary_budget``)

    @classmethod
    def from_settings(
        cls,
        *,
        device: str | None = None,
        stream: bool | None = None,
        offload_dir: Path | None = None,
        compute_dtype: str | None = None,
    ) -> Placement:
        """The settings' placement; arguments given win (``--device`` and friends)."""
        settings = get_settings()
        streaming = {"auto": None, "on": True, "off": False}[settings.stream]
        return cls(
            device=resolve_device(device or settings.device),
            stream=stream if stream is not None else streaming,
            offload_dir=offload_dir or settings.offload_dir,
            compute_dtype=compute_dtype or settings.compute_dtype,
            activation_budget_bytes=None if (gb := settings.activation_memory_gb) is None else gb * GIB,
        )

    def streams(self, cfg: QuantConfig) -> bool:
        """Whether a run of ``cfg`` is planned streamed (end-to-end fine-tuning needs the whole
        model); a checkpoint that cannot be streamed may still be loaded whole under ``auto``."""
        return self.stream is not False and not cfg.model_finetune_steps

    def __post_init__(self) -> None:
        # "auto" becomes the device's dtype; a name it does not know is a clear error
        object.__setattr__(self, "compute_dtype", resolve_compute_dtype(self.compute_dtype, self.device))
        if self.stream is False and self.device.type != "cpu":
            raise ConfigError(f"a model loaded whole is computed on the CPU; {self.device} needs streaming")
