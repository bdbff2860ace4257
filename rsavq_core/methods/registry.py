"""The method registry: every quantization method is one module of this package, found by its name.

A method (in the style of vLLM's quantization configs) declares

* ``options_type``: a frozen dataclass of ``knob`` fields: its options. The command line's flags,
  the API's request schema and the validation all come from it;
* ``statistics(cfg)``: the calibration statistics it needs (``StatsNeeds``);
* ``quantize_layer(weight, bias, stats, cfg)``: one linear layer -> a packed layer of one of the
  registered formats (``rsavq_core.formats``), and a report of plain numbers;
* optionally ``shared_fit(cfg, layers_per_type)``: what the layers of one type (the same name in
  every block) share, fitted on all of them before the per-block pass and handed to
  ``quantize_layer`` as ``shared``.

The pipeline, the command line and the service only ask this registry; none of them branches on a
method's name. Adding a method is one new module that calls ``register_method`` (built-ins are
imported by the package's ``__init__``). Importing a method module must not import torch: the API
process validates requests with the options alone, so algorithms are imported inside
``quantize_layer``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from rsavq_core.config.knobs import Knob, MethodOptions, knobs
from rsavq_core.errors import ConfigError
from rsavq_core.progress import Progress

if TYPE_CHECKING:
    import torch

    from rsavq_core.calibration.statistics import LayerStats
    from rsavq_core.config.quant_config import QuantConfig
    from rsavq_core.formats.base import QuantizedLayer


@dataclass(frozen=True)
class StatsNeeds:
    """Which calibration statistics a run needs."""

    gradients: bool = False  # mean gradient and Fisher factors (backward passes through every block)
    hessian: bool = False  # activation Hessian E[x xᵀ] of every linear's input

    @property
    def any(self) -> bool:
        return self.gradients or self.hessian


class SharedFit(Protocol):
    """Collects every layer of each type (``add``), then fits what they share (``fit``)."""

    def add(self, name: str, weight: torch.Tensor, stats: LayerStats | None) -> None:
        """One layer of type ``name`` (its name inside its block); weight [M, N] floating."""

    def fit(self, finished: dict[str, Any], progress: Progress | None = None) -> dict[str, Any]:
        """Type name -> what its layers share, for ``quantize_layer``'s ``shared``. ``finished``: type
        -> a layer of it an interrupted run finished (what it shares must be what that layer used).
        ``progress("shared codebooks: fit", done, total)`` after each type: a fit can take minutes."""


class QuantMethod(ABC):
    """One quantization method. Subclasses set the class attributes and implement the two methods."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line, for --help and the API's documentation
    options_type: ClassVar[type[MethodOptions]]
    block_finetune_steps: ClassVar[int] = 0  # QuantConfig.block_finetune_steps when not given

    def validate(self, cfg: QuantConfig) -> None:  # noqa: B027 - optional hook, no rules by default
        """Rules between knobs (the knobs themselves are already valid); raise ``ConfigError``."""

    def check_layers(self, cfg: QuantConfig, shapes: dict[str, tuple[int, int]]) -> None:  # noqa: B027
        """Rules between the config and the model's layers ({name: (out, in)}), checked after the
        model is loaded and before calibration; raise ``ConfigError``. None by default."""

    def resolve(self, options: MethodOptions, cfg: QuantConfig) -> MethodOptions:
        """The options with every knob left to be derived (None) set from the others and the config's
        shared knobs (``cfg.bits``...; ``cfg.options`` is not resolved yet: read ``options``)."""
        return options

    @abstractmethod
    def statistics(self, cfg: QuantConfig) -> StatsNeeds:
        """The calibration statistics this run needs."""

    @abstractmethod
    def quantize_layer(
        self,
        weight: torch.Tensor,  # [M, N] floating, the linear's weight (rows = output channels)
        bias: torch.Tensor | None,  # [M] floating, copied into the packed layer
        stats: LayerStats | None,  # this layer's statistics, None when statistics() needs none
        cfg: QuantConfig,
        shared: Any = None,  # what ``shared_fit`` fitted for this layer's type, or None
    ) -> tuple[QuantizedLayer, dict[str, Any]]:
        """The packed layer and its report (``bits``, errors, ``seconds``: plain JSON values)."""

    def shared_fit(self, cfg: QuantConfig, layers_per_type: int) -> SharedFit | None:
        """What the run's layers of one type share (None: nothing, the default)."""
        return None


_METHODS: dict[str, QuantMethod] = {}
M = TypeVar("M", bound=type[QuantMethod])


def register_method(cls: M) -> M:
    """Class decorator: register one instance of ``cls`` under ``cls.name``.

    A knob name shared with another method (``group_size``, ``hessian_damping``...) must have the
    same type there: the command line and the API offer one flag / field per name.
    """
    if cls.name in _METHODS:
        raise ValueError(f"a quantization method named {cls.name!r} is already registered")
    mine = {k.name: k for k in knobs(cls.options_type)}
    for other in _METHODS.values():
        for k in knobs(other.options_type):
            if k.name in mine and (mine[k.name].base, mine[k.name].choices) != (k.base, k.choices):
                raise TypeError(f"option {k.name!r} of method {cls.name!r} differs in type from {other.name!r}'s")
    _METHODS[cls.name] = cls()
    return cls


def unregister_method(name: str) -> None:
    _METHODS.pop(name, None)


def get_method(name: str) -> QuantMethod:
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(_METHODS)}") from None


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def methods() -> tuple[QuantMethod, ...]:
    return tuple(_METHODS.values())


def option_knobs() -> dict[str, tuple[Knob, list[QuantMethod]]]:
    """Every method option by name, with the methods that have it (in registration order)."""
    out: dict[str, tuple[Knob, list[QuantMethod]]] = {}
    for method in _METHODS.values():
        for k in knobs(method.options_type):
            out.setdefault(k.name, (k, []))[1].append(method)
    return out


def option_names(method: QuantMethod) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(method.options_type))


def describe_option(name: str) -> str:
    """A method option's help for users: its text, the methods that have it and their defaults."""
    k, owners = option_knobs()[name]
    defaults = {m.name: next(o.default for o in knobs(m.options_type) if o.name == name) for m in owners}
    first = owners[0].name
    shown = f"default {defaults[first]!r}" + "".join(
        f", {m} {d!r}" for m, d in defaults.items() if m != first and d != defaults[first]
    )
    return f"{k.help} [{', '.join(defaults)}; {shown}]"
