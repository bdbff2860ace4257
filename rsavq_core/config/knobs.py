"""Knobs: dataclass fields that carry their help text and bounds, validated in one place.

A method's options and ``QuantConfig``'s own fields are declared with ``knob``; from that one
declaration come the validation below (with the messages users see), the ``rsavq`` command
line's flags and the API's request schema (bounds and enums in the OpenAPI document). Choices
are ``Literal`` types: their values are read from the annotation, never listed again.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from rsavq_core.errors import ConfigError


def knob(default: Any, help: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    """A dataclass field with a help text and optional bounds (``ge`` / ``gt`` <= value <= ``le``)."""
    return dataclasses.field(default=default, metadata={"help": help, "ge": ge, "gt": gt, "le": le})


@dataclass(frozen=True)
class Knob:
    """One knob, as read from its dataclass field."""

    name: str
    base: type  # int, float, bool or str
    default: Any
    help: str
    nullable: bool = False  # None is allowed ("derived")
    choices: tuple[str, ...] | None = None  # for Literal types
    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def interval(self) -> str:
        def show(bound: float) -> str:  # an integer bound exactly (1048576, not 1.04858e+06)
            return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"

        low = f"[{show(self.ge)}" if self.ge is not None else f"({show(self.gt)}" if self.gt is not None else "(-inf"
        high = f"{show(self.le)}]" if self.le is not None else "inf)"
        return f"{low}, {high}"

    def check(self, value: Any) -> None:
        """Raise ``ConfigError`` unless ``value`` is a valid value of this knob."""
        if value is None and self.nullable:
            return
        if self.choices is not None:
            if value not in self.choices:
                raise ConfigError(f"unknown {self.name} {value!r}; choose one of {', '.join(self.choices)}")
        elif self.base is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{self.name} must be true or false, got {value!r}")
        elif self.base is int:
            if not isinstance(value, int) or isinstance(value, bool) or not self._inside(value):
                raise ConfigError(f"{self.name} must be {self._integer_words()}, got {value!r}")
        elif self.base is float:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfigError(f"{self.name} must be a number, got {value!r}")
            if not self._inside(value):
                raise ConfigError(f"{self.name} must lie in {self.interval()}, got {value:g}")
        elif not isinstance(value, self.base):
            raise ConfigError(f"{self.name} must be a {self.base.__name__}, got {value!r}")

    def _inside(self, value: float) -> bool:
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
        )

    def _integer_words(self) -> str:
        if self.le is None and self.gt is None and self.ge in (0, 1):
            return "a positive integer" if self.ge == 1 else "a non-negative integer"
        return "an integer" if self.ge is None and self.le is None else f"an integer in {self.interval()}"


_KNOBS: dict[type, tuple[Knob, ...]] = {}


def knobs(cls: type) -> tuple[Knob, ...]:
    """The knobs of a dataclass, in field order (fields declared without ``knob`` are left out)."""
    if cls not in _KNOBS:
        _KNOBS[cls] = _read_knobs(cls)
    return _KNOBS[cls]


def _read_knobs(cls: type) -> tuple[Knob, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        base, nullable, choices = _describe(hints[f.name], f"{cls.__name__}.{f.name}")
        meta = f.metadata
        out.append(Knob(f.name, base, f.default, meta["help"], nullable, choices, meta["ge"], meta["gt"], meta["le"]))
    return tuple(out)


def validate_knobs(obj: Any) -> None:
    """Check every knob of a dataclass instance (``ConfigError`` with the first problem)."""
    for k in knobs(type(obj)):
        k.check(getattr(obj, k.name))


def _describe(hint: Any, where: str) -> tuple[type, bool, tuple[str, ...] | None]:
    """(base type, nullable, Literal choices) of a field's type hint."""
    args = typing.get_args(hint)
    nullable = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        nullable = len(rest) < len(args)
        if len(rest) != 1:
            raise TypeError(f"{where}: a knob has one type (optionally | None), got {hint}")
        hint, args = rest[0], typing.get_args(rest[0])
    if typing.get_origin(hint) is Literal:
        return str, nullable, tuple(str(a) for a in args)
    if hint in (int, float, bool, str):
        return hint, nullable, None
    raise TypeError(f"{where}: unsupported knob type {hint}")


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options: a frozen dataclass of ``knob`` fields, validated on construction."""

    def __post_init__(self) -> None:
        validate_knobs(self)
