"""Command-line flags generated from the knobs: ``QuantConfig``'s own and every method's options.

One flag per knob name (``--kmeans-iters``), never listed by hand: a new knob or a new method's
options appear here by themselves. Unset flags are None, so the method's defaults apply.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rsavq_core.config.knobs import Knob
from rsavq_core.config.presets import PRESETS
from rsavq_core.config.quant_config import QuantConfig, shared_knobs
from rsavq_core.methods.registry import describe_option, method_names, methods, option_knobs


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def knob_names() -> list[str]:
    """Every knob that has a flag (``bits`` included)."""
    return [k.name for k in shared_knobs()] + list(option_knobs())


def _add(group: argparse._ArgumentGroup, k: Knob, help: str, *, required: bool = False, many: bool = False) -> None:
    kwargs: dict[str, Any] = {"dest": k.name, "default": None, "help": help, "required": required}
    if many:
        kwargs["nargs"] = "+"
    if k.base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif k.choices is not None:
        kwargs["choices"] = k.choices
    else:
        kwargs["type"] = k.base
        kwargs["metavar"] = "N" if k.base is int else "X"
    group.add_argument(flag_of(k.name), **kwargs)


def add_config_flags(parser: argparse.ArgumentParser, *, several_bits: bool = False) -> None:
    """``--method``, ``--bits`` (required; with ``several_bits`` one or more) and a flag for every other knob."""
    summaries = "; ".join(f"{m.name}: {m.summary}" for m in methods())
    parser.add_argument("--method", default="rsavq", choices=method_names(), help=f"default rsavq. {summaries}")
    presets = "; ".join(f"{name}: {', '.join(f'{k}={v}' for k, v in knobs.items())}" for name, knobs in PRESETS.items())
    parser.add_argument("--preset", choices=sorted(PRESETS), help=f"named knob values; explicit flags win. {presets}")
    shared = parser.add_argument_group("every method")
    for k in shared_knobs():
        bounds = f" {k.interval()}" if k.ge is not None or k.gt is not None or k.le is not None else ""
        default = "" if k.name == "bits" else f" (default {k.default!r})"
        many = several_bits and k.name == "bits"
        text = f"{k.help}{bounds}{default}" + (": several budgets, one job each" if many else "")
        _add(shared, k, text, required=k.name == "bits", many=many)
    own = parser.add_argument_group("method options", "[the methods that have an option; their defaults]")
    for name, (k, _) in option_knobs().items():
        _add(own, k, describe_option(name))


def knobs_from_args(args: argparse.Namespace, *, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The knobs given on the command line (flags left unset are absent), and the preset if given."""
    names = [*knob_names(), "preset"]
    return {n: getattr(args, n) for n in names if n not in exclude and getattr(args, n, None) is not None}


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    """The validated config of the flags (``ConfigError`` for a knob the method does not have)."""
    return QuantConfig.for_method(args.method, **knobs_from_args(args))


def placement_from_args(args: argparse.Namespace) -> Any:
    """The run's ``Placement``: the settings (``RSAVQ_DEVICE``...) with the flags given on top."""
    from rsavq_core.pipeline.placement import Placement

    stream = {"on": True, "off": False}.get(args.stream or "")
    return Placement.from_settings(
        device=args.device,
        stream=stream,
        offload_dir=Path(args.offload_dir) if args.offload_dir else None,
        compute_dtype=args.compute_dtype,
    )


def placement_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="where to compute: auto (cuda when present, else cpu), cpu, cuda, cuda:N")
    p.add_argument(
        "--stream",
        choices=("auto", "on", "off"),
        help="read the model block by block from disk (auto: whenever the run and checkpoint allow) or whole (off)",
    )
    p.add_argument("--offload-dir", help="where calibration activations past the memory budget are written")
    p.add_argument(
        "--compute-dtype",
        choices=("auto", "float32", "bfloat16"),
        help="precision of the calibration forwards (auto: bfloat16 on a GPU, float32 on the CPU)",
    )


def apply_placement_flags(args: argparse.Namespace) -> None:
    """Make ``--device`` / ``--stream`` / ``--offload-dir`` / ``--compute-dtype`` this process's settings (and, through
    them, those of the fresh processes a command spawns for its runs)."""
    from rsavq_core.settings import configure, get_settings, load_settings

    changes = placement_settings(args)
    if changes:
        current = get_settings()
        configure(load_settings(type(current), **{**current.model_dump(), **changes}))


def placement_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings ``--device`` / ``--stream`` / ``--offload-dir`` give (those not given are left out)."""
    given = {
        "device": args.device,
        "stream": args.stream,
        "offload_dir": args.offload_dir,
        "compute_dtype": args.compute_dtype,
    }
    return {k: v for k, v in given.items() if v is not None}
