"""Per-layer checkpoints (resume of a killed run) and byte-reproducible safetensors files."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.errors import ConfigError
from rsavq_core.pipeline.resume import FinishedLayers
from tests.core.test_artifact import assert_same_layer, make_scalar_layer, make_vq_layer

CFG = QuantConfig.for_method("rsavq", bits=2)


def test_layers_round_trip_and_survive_a_new_process_object(tmp_path: Path) -> None:
    vq, scalar = make_vq_layer(48, 48, 4, 2, [2, 1, 3], bias=True, seed=1), make_scalar_layer(48, 96, 3, 40, seed=3)
    ckpt = FinishedLayers(tmp_path, CFG, "fp1")
    assert ckpt.load("a.q") is None
    ckpt.save("a.q", vq, {"bits": [2, 1, 3], "proxy_error": 0.25})
    ckpt.save("b.down", scalar, {"bits": [3]})
    again = FinishedLayers(tmp_path, CFG, "fp1")  # what a restarted worker builds
    assert again.finished() == ["a.q", "b.down"]
    loaded = again.load("a.q")
    assert loaded is not None
    layer, report = loaded
    assert_same_layer(vq, layer)
    assert report == {"bits": [2, 1, 3], "proxy_error": 0.25}
    loaded = again.load("b.down")
    assert loaded is not None
    assert_same_layer(scalar, loaded[0])


def test_a_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    FinishedLayers(tmp_path, CFG, "fp1")
    with pytest.raises(ConfigError, match="different run"):
        FinishedLayers(tmp_path, CFG.replace(lam=0.1), "fp1")
    with pytest.raises(ConfigError, match="different run"):
        FinishedLayers(tmp_path, CFG, "another-model")


def test_a_checkpoint_from_before_calib_data_existed_resumes(tmp_path: Path) -> None:
    """A job running across the upgrade that added ``calib_data`` (None for it) is the same run."""
    import json

    FinishedLayers(tmp_path, CFG, "fp1")
    run = tmp_path / "run.json"
    stored = json.loads(run.read_text())
    del stored["config"]["calib_data"]
    run.write_text(json.dumps(stored))
    FinishedLayers(tmp_path, CFG, "fp1")  # no ConfigError
    with pytest.raises(ConfigError, match="different run"):
        FinishedLayers(tmp_path, CFG.replace(calib_data="0" * 64), "fp1")


def test_a_torn_layer_file_is_discarded_and_redone(tmp_path: Path) -> None:
    ckpt = FinishedLayers(tmp_path, CFG, "fp1")
    ckpt.save("a.q", make_vq_layer(48, 48, 4, 2, [2, 2]), {})
    file = tmp_path / "a.q.safetensors"
    file.write_bytes(file.read_bytes()[:200])
    assert ckpt.load("a.q") is None and not file.exists()


def test_same_content_gives_the_same_bytes_in_every_process(tmp_path: Path) -> None:
    code = (
        "import sys, torch; from pathlib import Path; from rsavq_core.checkpoint.canonical import save_canonical; "
        "save_canonical({'w': torch.arange(6.).reshape(2, 3), 'i': torch.arange(4)}, Path(sys.argv[1]), "
        "{k: k * 3 for k in 'abcdefghijklmnopqrstuvwxyz'})"
    )
    digests = set()
    for i in range(3):  # safetensors alone orders metadata by a per-process random hash seed
        out = tmp_path / f"f{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(out)], check=True)
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "f0.safetensors"))["w"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_only_finite_values_past_float16s_range_count_as_overflowing() -> None:
    import torch

    from rsavq_core.checkpoint.packed import _overflows_half

    assert not _overflows_half(torch.tensor([65504.0, -65519.0]))  # both round to ±65504
    assert _overflows_half(torch.tensor([1.0, -65520.0]))  # rounds to -inf
    assert _overflows_half(torch.tensor([70000.0], dtype=torch.bfloat16))
    assert not _overflows_half(torch.tensor([float("inf"), 1e9]))  # not finite already: nothing new breaks
