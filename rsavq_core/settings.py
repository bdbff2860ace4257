"""What the library reads from the environment, in one object read once per process.

Every ``RSAVQ_*`` variable the library honours is a field here (pydantic-settings); nothing else
in ``rsavq_core`` reads ``os.environ``. The job service's ``Settings`` extends this class, so a
service process holds one settings object that both the service and the library read
(``configure`` installs it). Tests change settings with ``override``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from rsavq_core.errors import ConfigError


class CoreSettings(BaseSettings):
    """The library's settings (environment variable = ``RSAVQ_`` + the field name, upper case)."""

    model_config = SettingsConfigDict(env_prefix="RSAVQ_", extra="ignore", frozen=True, populate_by_name=True)

    cache_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "rsavq",
        description="converted models and calibration statistics",
    )
    kernels: Literal["auto", "off", "interpret"] = Field(
        "auto",
        description="Triton kernels: auto (on CUDA), off (the torch reference everywhere), "
        "interpret (also on the CPU when TRITON_INTERPRET=1; very slow)",
    )
    gemv_max_tokens: int | None = Field(
        None, ge=1, description="largest token count on the fused GEMV (default: measured per GPU)"
    )
    device: str = Field(
        "auto",
        description="where quantization computes: auto (cuda when present, else cpu), cpu, cuda, cuda:N",
    )
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="precision of the calibration forwards (auto: bfloat16 on a GPU that has it, else float32; "
        "see rsavq_core/precision.py)",
    )
    stream: Literal["auto", "on", "off"] = Field(
        "auto",
        description="read the model block by block from its safetensors files (auto: whenever the run and "
        "the checkpoint allow it) or load it whole (off)",
    )
    offload_dir: Path | None = Field(
        None, description="where calibration activations past the memory budget are spilled (default: a temp dir)"
    )
    activation_memory_gb: float | None = Field(
        None,
        ge=0,
        description="host memory for calibration activations before they spill to the offload dir "
        "(default: two block boundaries, so that memory does not grow with depth)",
    )
    stats_cache_gb: float = Field(
        20.0,
        ge=0,
        description="largest statistics store a streamed run writes to the cache; past it, activation "
        "Hessians are computed block by block as the run goes (not cached)",
    )
    triton_interpret: bool = Field(
        False,
        validation_alias=AliasChoices("TRITON_INTERPRET"),
        description="Triton's own switch, read here so the kernel policy knows the interpreter is on",
    )


_current: CoreSettings | None = None


S = TypeVar("S", bound="CoreSettings")


def load_settings(cls: type[S], **values: Any) -> S:
    """A settings object of ``cls`` from the environment (``values`` win), as a ``ConfigError`` on bad input."""
    try:
        return cls(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'RSAVQ_' + '.'.join(map(str, e['loc'])).upper() if e['loc'] else 'settings'}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc


def get_settings() -> CoreSettings:
    """The process's settings: read from the environment on first use, or what ``configure`` set."""
    global _current
    if _current is None:
        _current = load_settings(CoreSettings)
    return _current


def configure(settings: CoreSettings) -> None:
    """Make ``settings`` the process's settings (the service installs its own, a subclass)."""
    global _current
    _current = settings


@contextlib.contextmanager
def override(**changes: Any) -> Iterator[CoreSettings]:
    """Within the block, the process's settings with ``changes`` applied (validated)."""
    before = get_settings()
    configure(load_settings(type(before), **{**before.model_dump(), **changes}))
    try:
        yield get_settings()
    finally:
        configure(before)
