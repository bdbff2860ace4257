"""Two processes, same model, config and seed: byte-identical packed checkpoints.

Each process computes its own calibration statistics (separate caches), as two machines would.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rsavq_core.checkpoint.packed import WEIGHTS_FILE
from tests.timing import patience


@pytest.fixture(scope="module")
def tiny_folder(tiny_llama: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tokenizer = tiny_llama
    folder = tmp_path_factory.mktemp("model") / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def quantize_in_a_new_process(folder: Path, out: Path, cache: Path, method: str) -> str:
    layout = {"rsavq-per-layer": ["--n-groups", "2"], "rsavq": []}  # rsavq: the default, shared codebooks
    argv = [sys.executable, "-m", "service.cli", "quantize", str(folder), "--method", method.split("-")[0],
            "--bits", "2", "--calib-samples", "3", "--calib-len", "32", "--out", str(out), "--quiet"]  # fmt: skip
    if method.startswith("rsavq"):
        argv += ["--kmeans-iters", "2", *layout[method]]
    env = {**os.environ, "RSAVQ_CACHE_DIR": str(cache)}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=patience(600))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return hashlib.sha256((out / WEIGHTS_FILE).read_bytes()).hexdigest()


@pytest.mark.parametrize("method", ["rsavq", "rsavq-per-layer", "gptq"])
def test_two_processes_write_the_same_bytes(tiny_folder: Path, tmp_path: Path, method: str) -> None:
    first = quantize_in_a_new_process(tiny_folder, tmp_path / "a", tmp_path / "cache-a", method)
    second = quantize_in_a_new_process(tiny_folder, tmp_path / "b", tmp_path / "cache-b", method)
    assert first == second
    assert (tmp_path / "cache-a" / "stats").is_dir() and (tmp_path / "cache-b" / "stats").is_dir()
