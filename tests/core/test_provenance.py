"""Results carry their provenance, and a recorded run can be replayed exactly."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.errors import ConfigError
from rsavq_core.runs import replay
from rsavq_core.runs.provenance import REPO_ROOT, command_line, provenance


def test_provenance_names_the_commit_the_machine_the_versions_and_the_command() -> None:
    record = provenance(["bench/bench_quality.py", "--rows", "fast 3 bits"])
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert record["commit"] == head.stdout.strip()
    assert isinstance(record["dirty"], bool)
    assert record["command"] == "python bench/bench_quality.py --rows 'fast 3 bits'"
    machine = record["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["fp32_gflops"] > 0
    assert set(record["versions"]) >= {"python", "torch", "transformers"}
    assert record["date"][:2] == "20" and "T" in record["date"]


def test_an_entry_point_is_named_as_typed() -> None:
    assert command_line(["/some/venv/bin/rsavq", "quantize", "m"]) == "rsavq quantize m"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--model", required=True)
    parser.add_argument("--bits", type=int, action="append")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--graphs", action="store_true")
    parser.add_argument("--json", type=Path, default=Path("out.json"))
    return parser


def test_a_replay_runs_the_recorded_arguments_and_flags_given_again_win(tmp_path: Path) -> None:
    first = replay.parse_args(
        _parser(), ["a", "b", "--model", "m", "--bits", "2", "--repeats", "5", "--graphs"], output="json"
    )
    record = tmp_path / "run.json"
    record.write_text(json.dumps({"rows": [], "provenance": {"args": replay.recorded_args(first)}}))

    again = replay.parse_args(_parser(), ["--replay", str(record), "--repeats", "7"], output="json")
    assert again.artifacts == ["a", "b"] and again.model == "m" and again.bits == [2] and again.graphs
    assert again.repeats == 7  # given again: wins over the record
    assert again.json == record.with_suffix(".replay.json")  # the record is never overwritten

    (tmp_path / "old.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ConfigError, match="records no arguments"):
        replay.parse_args(_parser(), ["--replay", str(tmp_path / "old.json")], output="json")


@pytest.mark.parametrize(
    "method,bits,knobs",
    [("rsavq", 2, {}), ("rsavq", 3, {}), ("rsavq", 4, {}), ("rsavq", 3, {"preset": "fast"}), ("gptq", 3, {})],
)
def test_a_recorded_config_replays_to_the_same_config(method: str, bits: int, knobs: dict[str, str]) -> None:
    cfg = QuantConfig.for_method(method, bits=bits, **knobs)
    assert QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_summary_rows_replay_their_resolved_configs_not_todays_defaults(tmp_path: Path) -> None:
    recorded = QuantConfig.for_method("rsavq", bits=3, block_finetune_steps=5).to_dict()
    evaluation: dict[str, Any] = {"ppl": True, "tasks": None, "limit": None, "perplexity_windows": 2, "texts": []}
    rows = [
        {"label": "FP", "target": "m", "evaluation": evaluation},
        {"label": "q", "model": "m", "config": recorded, "evaluation": evaluation},
    ]
    file = tmp_path / "rows.json"
    file.write_text(json.dumps({"model": "m", "rows": rows}))
    fp, q = replay.summary_runs(file)
    assert fp.config is None and fp.model == "m" and fp.evaluation["perplexity_windows"] == 2
    assert q.config is not None and q.config.to_dict() == recorded and q.config.block_finetune_steps == 5

    rows[1]["evaluation"] = {**evaluation, "texts": [{"name": "mine", "sha256": "ab"}]}
    file.write_text(json.dumps({"rows": rows}))
    with pytest.raises(ConfigError, match="uploaded texts"):
        replay.summary_runs(file)


def test_a_result_file_being_written_does_not_make_the_code_dirty(tmp_path: Path) -> None:
    import subprocess

    from rsavq_core.runs.provenance import RESULTS_DIR, git_state

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / RESULTS_DIR).mkdir(parents=True)
    (tmp_path / RESULTS_DIR / "x.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    (tmp_path / RESULTS_DIR / "x.json").write_text('{"rows": 1}')
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path)["dirty"] is True
