"""The one command line: every command listed with its purpose, every --help works, every command
that deploy/ runs parses, and every knob of every method has a flag."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from rsavq_core.config.knobs import knobs
from rsavq_core.config.quant_config import shared_knobs
from rsavq_core.methods.registry import methods
from service.cli import build_parser, main
from service.cli.flags import flag_of
from tests.timing import patience

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = [
    "serve", "worker", "generation-server", "db", "keys", "submit", "sweep", "dataset-upload", "sweep-status",
    "status", "wait", "download", "cancel", "metrics", "quantize", "eval", "generate", "ablation",
]  # fmt: skip


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_help_lists_every_command_with_its_purpose(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^    (\S+)\s+\S", out, flags=re.M) + re.findall(r"^    (\S+)\n {10,}\S", out, flags=re.M)
    assert sorted(set(listed)) == sorted(COMMANDS)
    assert list(_subparsers(build_parser())) == COMMANDS  # and nothing else


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert f"usage: rsavq {command}" in capsys.readouterr().out


def test_the_installed_entry_point_runs_generation_server_help() -> None:
    rsavq = Path(sys.executable).with_name("rsavq")
    proc = subprocess.run(
        [str(rsavq), "generation-server", "--help"], capture_output=True, text=True, timeout=patience(60)
    )
    assert proc.returncode == 0, proc.stderr
    assert "--memory-gb" in proc.stdout


def _deploy_commands() -> Iterator[tuple[str, list[str]]]:
    """(file, argv) of every container command in deploy/: compose, Kubernetes and the Dockerfile."""

    def walk(node: Any) -> Iterator[list[str]]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("command", "args") and isinstance(value, list) and all(isinstance(v, str) for v in value):
                    yield value
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    for file in sorted((ROOT / "deploy").rglob("*.yaml")):
        for doc in yaml.safe_load_all(file.read_text()):
            for argv in walk(doc):
                yield file.name, argv
    for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines():
        if line.startswith("CMD ["):
            yield "Dockerfile", json.loads(line[4:])


def test_every_deployed_command_parses() -> None:
    found = list(_deploy_commands())
    ours = [(f, argv) for f, argv in found if argv[0] in ("rsavq", "uvicorn")]
    assert {argv[1] for _, argv in ours if argv[0] == "rsavq"} >= {"db", "worker", "generation-server"}
    parser = build_parser()
    for file, argv in ours:
        if argv[0] == "rsavq":
            args = parser.parse_args(argv[1:])  # SystemExit(2) on anything argparse refuses
            assert callable(args.func), (file, argv)
        else:  # uvicorn module:factory --factory
            module, _, name = argv[1].partition(":")
            assert callable(getattr(importlib.import_module(module), name)), (file, argv)
            assert "--factory" in argv


@pytest.mark.parametrize("command", ["quantize", "submit"])
def test_every_knob_of_every_method_has_a_flag(command: str) -> None:
    parser = _subparsers(build_parser())[command]
    flags = {opt for action in parser._actions for opt in action.option_strings}
    names = [k.name for k in shared_knobs()] + [k.name for m in methods() for k in knobs(m.options_type)]
    missing = [name for name in names if flag_of(name) not in flags]
    assert not missing, f"knobs without a {command} flag: {missing}"
    method = next(a for a in parser._actions if "--method" in a.option_strings)
    assert list(method.choices or []) == [m.name for m in methods()]


def test_choices_come_from_the_knob_types() -> None:
    parser = _subparsers(build_parser())["quantize"]
    allocation = next(a for a in parser._actions if "--allocation" in a.option_strings)
    assert list(allocation.choices or []) == ["proportional", "additive", "uniform"]
    with pytest.raises(SystemExit):
        parser.parse_args(["m", "--bits", "2", "--allocation", "greedy"])
