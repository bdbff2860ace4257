"""The format registry: every packed layer format is one module here, found by its ``kind``.

The packed checkpoint, the bit counter and ``QuantLinear`` ask this registry for a layer's format
and hold no per-format branches. Adding a format is one module that subclasses ``LayerFormat`` and
calls ``register_format`` (built-ins are imported by the package's ``__init__``).
"""

from __future__ import annotations

from typing import TypeVar

from rsavq_core.errors import ArtifactError
from rsavq_core.formats.base import LayerFormat, QuantizedLayer

_FORMATS: dict[str, LayerFormat] = {}
F = TypeVar("F", bound=type[LayerFormat])


def register_format(cls: F) -> F:
    """Class decorator: register one instance of ``cls`` under ``cls.kind``."""
    if cls.kind in _FORMATS:
        raise ValueError(f"a layer format of kind {cls.kind!r} is already registered")
    _FORMATS[cls.kind] = cls()
    return cls


def unregister_format(kind: str) -> None:
    _FORMATS.pop(kind, None)


def get_format(kind: object) -> LayerFormat:
    """The format of ``kind`` (``ArtifactError`` naming the known kinds otherwise)."""
    found = _FORMATS.get(kind) if isinstance(kind, str) else None
    if found is None:
        known = ", ".join(repr(k) for k in _FORMATS)
        raise ArtifactError(f"unknown layer kind {kind!r}; expected one of {known}")
    return found


def format_of(layer: QuantizedLayer) -> LayerFormat:
    return get_format(getattr(layer, "kind", None))


def format_kinds() -> tuple[str, ...]:
    return tuple(_FORMATS)
