"""The real bundled model through the whole CLI path (slow: minutes on 2 CPU cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.cli import main

pytestmark = pytest.mark.slow


def test_quantize_eval_generate_smol(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q"
    # Few, short calibration windows keep this to minutes; the protocol's perplexity on 4 windows.
    code = main(
        [
            "quantize",
            "smollm2-135m",
            "--bits",
            "2",
            "--calib-samples",
            "4",
            "--calib-len",
            "128",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert 2.0 <= summary["bits"]["quantized"]["bpw"] <= 2.1

    assert main(["eval", str(out), "--ppl", "--windows", "4", "--quiet"]) == 0
    quant = json.loads(capsys.readouterr().out)["perplexity"]
    assert main(["eval", "smollm2-135m", "--ppl", "--windows", "4", "--quiet"]) == 0
    fp = json.loads(capsys.readouterr().out)["perplexity"]
    # 2-bit quantization of a 135M model costs perplexity, but it must stay a language model:
    # a random model of this shape scores about 51,000 (assets.md).
    assert fp["ppl"] < quant["ppl"] < 5000

    assert main(["generate", str(out), "--prompt", "The capital of France is", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()
