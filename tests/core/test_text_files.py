"""Your own calibration and evaluation text: parsing, clear errors, overlap, and runs that use it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.data.text_files import check_overlap, parse_text, read_text_file, too_short
from rsavq_core.data.windows import calibration_windows, wiki_documents
from rsavq_core.errors import CalibrationError, ConfigError
from rsavq_core.pipeline.quantize import quantize_model
from service.cli import main
from tests.core.test_pipeline_cli import CALIB, workspace  # noqa: F401 - a fixture


def test_plain_text_is_split_at_blank_lines_and_jsonl_reads_its_text_field() -> None:
    plain = parse_text(b"First paragraph,\nstill first.\n\n\nSecond.\r\n\r\nThird.\n", "notes.txt")
    assert plain.format == "text" and plain.documents == ("First paragraph,\nstill first.", "Second.", "Third.")
    rows = b'{"text": "one", "id": 1}\n\n{"text": " two "}\n'
    jsonl = parse_text(rows, "data.jsonl")
    assert jsonl.format == "jsonl" and jsonl.documents == ("one", "two") and jsonl.size == len(rows)
    assert jsonl.label == f"data.jsonl@{jsonl.sha256[:12]}"


@pytest.mark.parametrize(
    "data, name, message",
    [
        (b"caf\xe9 au lait", "a.txt", "not UTF-8 text: invalid continuation byte at byte 3"),
        (b"  \n\n \n", "a.txt", "holds no text"),
        (b'{"text": "ok"}\n{"txt": "no"}\n', "a.jsonl", "line 2 is not an object with a string 'text'"),
        (b'{"text": "ok"}\nnot json\n', "a.jsonl", "line 2 is not JSON"),
        (b'["text"]\n', "a.jsonl", "line 1 is not an object"),
    ],
)
def test_malformed_text_is_a_clear_error(data: bytes, name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_text(data, name)


def test_too_short_for_the_windows_and_overlap() -> None:
    calib = parse_text(b"alpha\n\nbeta\n\ngamma\n", "calib.txt")
    assert too_short(calib.name, calib.size, 2, 16) is not None and too_short(calib.name, calib.size, 1, 16) is None
    clean, dirty = parse_text(b"delta\n\nepsilon\n", "clean.txt"), parse_text(b"beta\n\nzeta\n", "dirty.txt")
    assert check_overlap(calib, [clean], allow=False) == {clean.label: 0}
    with pytest.raises(ConfigError, match=r"shares documents .*dirty.txt@\w+: 1 document"):
        check_overlap(calib, [clean, dirty], allow=False)
    assert check_overlap(calib, [dirty], allow=True) == {dirty.label: 1}


def test_calibration_windows_come_from_the_users_text(workspace: tuple[Path, Path], tiny_llama) -> None:  # noqa: F811
    _, tokenizer = tiny_llama
    docs = wiki_documents()
    mine = parse_text("\n\n".join(docs[-40:]).encode(), "mine.txt")
    windows = calibration_windows(tokenizer, 2, 16, source=mine)
    ids = tokenizer("\n\n".join(mine.documents), add_special_tokens=False)["input_ids"]
    rows = {tuple(ids[i : i + 16]) for i in range(0, len(ids) - 15, 16)}
    assert all(tuple(w.tolist()) in rows for w in windows)  # windows cut from this text, nothing else
    with pytest.raises(CalibrationError, match=r"tiny.txt holds 0 windows of 16 tokens \(\d+ tokens\); 2 requested"):
        calibration_windows(tokenizer, 2, 16, source=parse_text(b"Too short.", "tiny.txt"))


def test_a_run_records_its_calibration_text_and_scores_the_evaluation_text(
    workspace: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, folder = workspace
    docs = wiki_documents()
    calib, evaluation = tmp_path / "calib.jsonl", tmp_path / "eval.txt"
    calib.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:30]))
    evaluation.write_text("\n\n".join(docs[30:40]))
    argv = ["quantize", str(folder), "--bits", "3", "--method", "gptq", "--group-size", "16", "--quiet"]
    argv += ["--calib-samples", "2", "--calib-len", "16", "--calib-file", str(calib)]
    argv += ["--eval-file", str(evaluation), "--windows", "3", "--out", str(root / "q_text")]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    sha = read_text_file(calib).sha256
    assert summary["config"]["calib_data"] == sha and summary["texts"]["calibration"]["documents"] == 30
    ((label, scored),) = summary["eval"]["perplexity_on"].items()
    assert label == read_text_file(evaluation).label and scored["protocol"] == f"{label}-512"
    assert scored["windows"] == 3 and scored["ppl"] > 1
    cfg = QuantConfig.from_dict(summary["config"])
    with pytest.raises(ConfigError, match="calibrated on a text with sha256"):
        quantize_model(str(folder), cfg)  # the text it names must be given
    # evaluation text that repeats calibration documents is refused before anything runs
    evaluation.write_text(docs[5])
    assert main([*argv[: argv.index("--out")]]) == 2
    assert "shares documents" in capsys.readouterr().err
