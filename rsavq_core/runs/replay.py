"""Running a recorded measurement again, exactly: ``--replay FILE.json`` for the scripts under ``bench/``.

Two kinds of record:

* a quantization or evaluation summary (``rsavq quantize`` / ``eval`` output, an ablation row,
  ``bench/bench_quality.py`` and ``bench/bench_calibration.py`` rows) holds the *resolved* config
  and the evaluation settings: ``summary_runs`` turns it back into runs. Defaults that changed
  since the record was written do not change what a replay runs.
* any other script records its parsed arguments (``recorded_args``); ``parse_args`` with
  ``--replay`` starts from them, and flags given on the replaying command line win.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.errors import ConfigError

_UNSET = object()


def recorded_args(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed arguments as JSON values (paths as strings), without ``--replay`` itself."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "replay"}


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None, *, output: str) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with a ``--replay FILE.json`` option added.

    With ``--replay``, every argument takes the value recorded in FILE's ``provenance.args``
    unless given again on this command line; the output argument ``output`` (a destination name,
    e.g. ``"json"``) defaults to ``FILE.replay.json`` so the record is never overwritten.
    """
    parser.add_argument("--replay", type=Path, metavar="FILE.json", help="run the configuration recorded in FILE again")
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--replay", type=Path)
    known, _ = probe.parse_known_args(argv)
    if known.replay is None:
        return parser.parse_args(argv)
    recorded = json.loads(known.replay.read_text()).get("provenance", {}).get("args")
    if not isinstance(recorded, dict):
        raise ConfigError(f"{known.replay} records no arguments (provenance.args): it cannot be replayed")
    given = _given(parser, argv)
    args = argparse.Namespace(replay=known.replay)
    for action in parser._actions:  # argparse has no public list of its arguments
        if action.dest in ("help", "replay"):
            continue
        if action.dest in given:
            value = given[action.dest]
        elif action.dest == output:
            value = known.replay.with_suffix(".replay.json")
        else:
            value = recorded.get(action.dest, action.default)
        if action.type is Path and isinstance(value, str):
            value = Path(value)
        setattr(args, action.dest, value)
    return args


def _given(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict[str, Any]:
    """The arguments given explicitly in ``argv`` (required ones may be missing: the record has them)."""
    saved = [(a, a.default, a.required) for a in parser._actions]
    try:
        for action in parser._actions:
            # an append action adds to its default: None (not given) rather than the marker
            action.default = None if isinstance(action, argparse._AppendAction) else _UNSET
            action.required = False
        parsed = parser.parse_args(argv)
    finally:
        for action, default, required in saved:
            action.default, action.required = default, required
    return {k: v for k, v in vars(parsed).items() if v is not _UNSET and v is not None}


@dataclass(frozen=True)
class RecordedRun:
    """One recorded row, ready to run again."""

    label: str
    model: str
    config: QuantConfig | None  # None: an evaluation of the float model (an "FP" row)
    evaluation: dict[str, Any]
    record: dict[str, Any]  # the row as recorded, for comparing the numbers


def summary_runs(path: Path) -> list[RecordedRun]:
    """The runs recorded in a summary file: a list under ``"rows"``, or the file itself as one summary."""
    data = json.loads(Path(path).read_text())
    rows: list[dict[str, Any]] = data["rows"] if isinstance(data, dict) and "rows" in data else [data]
    runs = []
    for index, row in enumerate(rows):
        label = str(row.get("label") or f"row {index}")
        evaluation = row.get("evaluation")
        if evaluation is None:
            raise ConfigError(f"{path}, {label}: no recorded evaluation settings (written before provenance)")
        if evaluation.get("texts"):
            raise ConfigError(f"{path}, {label}: evaluated on uploaded texts, which a replay cannot read back")
        evaluation = {k: v for k, v in evaluation.items() if k != "texts"}
        if row.get("config") is None:
            runs.append(RecordedRun(label, str(row.get("target") or data.get("model")), None, evaluation, row))
            continue
        if (row.get("texts") or {}).get("calibration"):
            raise ConfigError(f"{path}, {label}: calibrated on an uploaded text, which a replay cannot read back")
        runs.append(RecordedRun(label, str(row["model"]), QuantConfig.from_dict(row["config"]), evaluation, row))
    return runs


def record(args: argparse.Namespace) -> dict[str, Any]:
    """A script's ``"provenance"`` entry: ``provenance()`` plus its parsed arguments, for ``--replay``."""
    from rsavq_core.runs.provenance import provenance

    return {**provenance(), "args": recorded_args(args)}
