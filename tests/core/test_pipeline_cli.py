"""The quantization job end to end on a tiny local model, and the CLI's validation / error exits."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.data.windows import calibration_windows
from rsavq_core.errors import ConfigError
from rsavq_core.formats.scalar import ScalarLayer
from rsavq_core.formats.vq_layer import VQLayer
from rsavq_core.models.layout import quantizable_linears
from rsavq_core.pipeline import calibration as pipeline_calibration
from rsavq_core.pipeline.placement import Placement
from rsavq_core.pipeline.quantize import QuantizeResult, quantize_model
from rsavq_core.runtime import QuantLinear, load_quantized_model, quantize_in_place
from rsavq_core.settings import override
from service.cli import main
from tests.timing import patience

CALIB: dict[str, Any] = dict(calib_samples=2, calib_len=16)
SMALL: dict[str, Any] = dict(**CALIB, kmeans_iters=2, n_groups=2)

WHOLE = Placement(stream=False)  # these tests compare with the float model, which a streamed run never holds


@pytest.fixture(scope="module")
def workspace(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_llama: Any,
    one_thread: None,
):
    """(root, model folder) with an isolated RSAVQ_CACHE_DIR; one thread for the tiny matmuls.

    ``calibration_windows`` is the real one (wiki text), memoised per (n, length): it tokenizes the
    whole 2 MB calibration text on every call (~2.5 s here), the same tokens every time.
    """
    model, tokenizer = tiny_llama
    root = tmp_path_factory.mktemp("pipeline")
    folder = root / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    real = calibration_windows
    memo: dict[tuple[Any, ...], torch.Tensor] = {}

    def windows(tok: Any, n: int, length: int, **sampling: Any) -> torch.Tensor:
        key = (n, length, *sorted(sampling.items()))
        if key not in memo:
            memo[key] = real(tok, n, length, **sampling)
        return memo[key].clone()

    with pytest.MonkeyPatch.context() as mp, override(cache_dir=root / "cache"):
        mp.setattr(pipeline_calibration, "calibration_windows", windows)
        yield root, folder


@pytest.fixture(scope="module")
def rsavq_run(workspace: tuple[Path, Path]) -> QuantizeResult:
    root, folder = workspace
    cfg = QuantConfig.for_method("rsavq", bits=2, **SMALL)
    return quantize_model(str(folder), cfg, out_dir=root / "q_rsavq", placement=WHOLE)


def reference_logits(result: QuantizeResult, ids: torch.Tensor) -> torch.Tensor:
    """The FP model with its other tensors rounded through fp16 and the dequantized layers swapped in."""
    ref = copy.deepcopy(result.model)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.half().float())
        for name, layer in result.layers.items():
            lin = ref.get_submodule(name)
            assert isinstance(lin, torch.nn.Linear)
            lin.weight.copy_(layer.dequantize(torch.float32))
            if lin.bias is not None:
                assert layer.bias is not None
                lin.bias.copy_(layer.bias.float())
        return ref(ids).logits


def check_artifact(result: QuantizeResult, tokenizer: Any) -> None:
    assert result.out_dir is not None and (result.out_dir / "rsavq.safetensors").is_file()
    loaded, tok, art = load_quantized_model(result.out_dir)
    assert tok is not None and len(tok) == len(tokenizer)
    assert set(art.layers) == set(result.layers)
    assert art.config == result.config
    assert all(isinstance(loaded.get_submodule(n), QuantLinear) for n in result.layers)
    ids = tokenizer("Quantization keeps the logits of the packed model equal.", return_tensors="pt").input_ids
    with torch.no_grad():
        got, fp = loaded(ids).logits, result.model(ids).logits
    want = reference_logits(result, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # Other route to the same model: QuantLinear swapped into the artifact-loaded model.
    again = quantize_in_place(copy.deepcopy(loaded), art.layers)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, got, rtol=0, atol=1e-6)
    assert (got - fp).abs().max() > 1e-4  # the quantized layers are really in use


def test_rsavq_end_to_end(workspace: tuple[Path, Path], rsavq_run: QuantizeResult, tiny_llama: Any) -> None:
    root, folder = workspace
    model, tokenizer = tiny_llama
    result = rsavq_run
    names = [n for n, _ in quantizable_linears(model)]
    assert sorted(result.layers) == sorted(names) and len(names) == 14
    assert not result.stats_cached
    assert (root / "cache" / "stats").is_dir() and any((root / "cache" / "stats").glob("*/meta.json"))
    assert {"load", "statistics", "quantize", "total"} <= set(result.timings)
    for name, layer in result.layers.items():
        assert isinstance(layer, VQLayer) and len(layer.groups) == 2
        mod = result.model.get_submodule(name)
        assert isinstance(mod, torch.nn.Linear)
        assert (layer.out_features, layer.in_features) == (mod.out_features, mod.in_features)
        spent = sum(g.bits * (g.stop - g.start) for g in layer.groups)
        assert spent <= 2 * layer.in_features
        report = result.reports[name]
        assert report["bits"] == [g.bits for g in layer.groups]
        assert 0 < float(report["proxy_error"]) < 1
        assert float(report["step_ratio"]) == pytest.approx(0.05, rel=1e-4)
    # The returned float model is untouched: it equals the checkpoint on disk.
    with torch.no_grad():
        for (name, lin), (_, orig) in zip(quantizable_linears(result.model), quantizable_linears(model)):
            assert torch.equal(lin.weight, orig.weight), name
    check_artifact(result, tokenizer)


def test_gptq_end_to_end(workspace: tuple[Path, Path], tiny_llama: Any) -> None:
    root, folder = workspace
    _, tokenizer = tiny_llama
    cfg = QuantConfig.for_method("gptq", bits=2, **CALIB)
    result = quantize_model(str(folder), cfg, out_dir=root / "q_gptq", placement=WHOLE)
    assert len(result.layers) == 14
    assert all(isinstance(layer, ScalarLayer) and layer.bits == 2 for layer in result.layers.values())
    assert all(r["hessian_error"] is not None for r in result.reports.values())
    check_artifact(result, tokenizer)


def test_second_run_reuses_statistics(workspace: tuple[Path, Path], rsavq_run: QuantizeResult) -> None:
    root, folder = workspace
    stores = sorted((root / "cache" / "stats").iterdir())
    cfg = QuantConfig.for_method("rsavq", bits=3, **{**SMALL, "kmeans_iters": 1})
    again = quantize_model(str(folder), cfg)
    assert again.stats_cached is True
    assert sorted((root / "cache" / "stats").iterdir()) == stores  # nothing new was computed
    assert again.out_dir is None
    assert all(
        isinstance(layer, VQLayer) and sum(g.bits * (g.stop - g.start) for g in layer.groups) <= 3 * layer.in_features
        for layer in again.layers.values()
    )
    # a Hessian-only method is served by the store with gradients, too
    assert quantize_model(str(folder), QuantConfig.for_method("gptq", bits=3, **CALIB)).stats_cached is True


def test_cli_quantize_rtn(workspace: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    root, folder = workspace
    out = root / "q_cli"
    code = main(
        ["quantize", str(folder), "--bits", "4", "--method", "rtn", "--group-size", "16", "--quiet", "--out", str(out)]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["method"] == "rtn" and summary["config"]["bits"] == 4 and summary["config"]["group_size"] == 16
    assert summary["out"] == str(out) and (out / "rsavq.safetensors").is_file()
    assert "layers" not in summary["bits"]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--bits", "9"], "[1, 8]"),
        (["--bits", "0.5"], "[1, 8]"),
        (["--bits", "2", "--vector-len", "5", "--n-pq", "2"], "not divisible"),
        (["--bits", "2.5", "--method", "gptq"], "integer bits"),
        (["--bits", "2", "--vector-len", "65"], "vector_len"),
        (["--bits", "3", "--vector-len", "6", "--n-pq", "1"], "2^16"),  # a 2^18-entry codebook
        (["--bits", "2", "--block-finetune-steps", "-1"], "block_finetune_steps"),
        (["--bits", "2", "--model-finetune-lr", "0"], "model_finetune_lr"),
        (["--bits", "2", "--block-finetune-lr", "2"], "block_finetune_lr"),
        (["--bits", "2", "--finetune-batch", "0"], "finetune_batch"),
    ],
)
def test_cli_config_errors_exit_2(
    argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], rsavq_settings: Any
) -> None:
    rsavq_settings(cache_dir=tmp_path)
    # the model id is never looked at: validation happens first
    code = main(["quantize", "some-model-that-does-not-exist", *argv, "--quiet"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("rsavq: error:") and needle in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_cli_unresolvable_model_exits_2_quickly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, rsavq_settings: Any
) -> None:
    rsavq_settings(cache_dir=tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    started = time.perf_counter()
    code = main(["quantize", "nobody-owns-this/no-such-model-123", "--bits", "2", "--quiet"])
    assert time.perf_counter() - started < patience(5.0)
    captured = capsys.readouterr()
    assert code == 2
    assert "cannot resolve" in captured.err and "nobody-owns-this/no-such-model-123" in captured.err
    assert captured.out == ""


def test_cli_unknown_method_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["quantize", "m", "--bits", "2", "--method", "awq"])
    assert info.value.code == 2
    assert "invalid choice: 'awq'" in capsys.readouterr().err


def test_cli_missing_bits_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["quantize", "m"])
    assert info.value.code == 2
    assert "--bits" in capsys.readouterr().err


def test_sequential_hessians_see_the_quantized_blocks(workspace: tuple[Path, Path]) -> None:
    """calib_inputs="quantized": block 0 sees the same inputs either way, block 1 the quantized block 0's outputs."""
    _, folder = workspace
    fp = quantize_model(str(folder), QuantConfig.for_method("gptq", bits=2, **CALIB))
    seq = quantize_model(str(folder), QuantConfig.for_method("gptq", bits=2, calib_inputs="quantized", **CALIB))
    assert "statistics" not in seq.timings  # Hessian-only: nothing from the float model's cache is needed

    def codes(result: QuantizeResult, block: int) -> dict[str, torch.Tensor]:
        return {n: cast(ScalarLayer, layer).codes for n, layer in result.layers.items() if f".{block}." in n}

    assert all(torch.equal(a, b) for a, b in zip(codes(fp, 0).values(), codes(seq, 0).values(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(codes(fp, 1).values(), codes(seq, 1).values(), strict=True))


@pytest.mark.parametrize(("method", "target"), [("rtn", "block"), ("rsavq", "block"), ("rtn", "model")])
def test_blockwise_finetuning_lowers_each_blocks_output_error(
    workspace: tuple[Path, Path], method: str, target: str
) -> None:
    _, folder = workspace
    knobs: dict[str, Any] = {
        **(SMALL if method == "rsavq" else CALIB),
        "block_finetune_steps": 12,
        "block_finetune_lr": 3e-4,
        "finetune_target": target,
    }
    bits = 2 if method == "rsavq" else 3
    tuned = quantize_model(str(folder), QuantConfig.for_method(method, bits=bits, **knobs))
    untuned = QuantConfig.for_method(method, bits=bits, **{**knobs, "block_finetune_steps": 0})
    plain = quantize_model(str(folder), untuned)
    for block in (0, 1):
        report = tuned.reports[f"model.layers.{block}.mlp.down_proj"]["finetune"]
        assert report["kept"] and report["loss_after"] < report["loss_before"], report
    name = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(tuned.layers[name].dequantize(), plain.layers[name].dequantize())  # trained...
    again = quantize_model(str(folder), QuantConfig.for_method(method, bits=bits, **knobs))
    assert torch.equal(again.layers[name].dequantize(), tuned.layers[name].dequantize())  # ... deterministically


def test_end_to_end_finetuning_is_saved_with_its_norms(workspace: tuple[Path, Path], tmp_path: Path) -> None:
    _, folder = workspace
    cfg = QuantConfig.for_method("rtn", bits=2, **CALIB, model_finetune_steps=4, model_finetune_lr=1e-3)
    result = quantize_model(str(folder), cfg, out_dir=tmp_path / "packed", checkpoint_dir=tmp_path / "work")
    report = result.model_finetune
    assert report["kept"] and report["kl_after"] < report["kl_before"], report
    assert (tmp_path / "work" / "model-finetune.pt").is_file()  # resumable
    loaded, _, _ = load_quantized_model(str(tmp_path / "packed"))
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(loaded.get_parameter(norm).float(), result.model.get_parameter(norm).float())
    assert not torch.allclose(loaded.get_parameter(norm).float(), torch.ones_like(loaded.get_parameter(norm).float()))
    name = "model.layers.0.self_attn.q_proj"
    one_shot = quantize_model(str(folder), QuantConfig.for_method("rtn", bits=2, **CALIB))
    assert not torch.equal(result.layers[name].dequantize(), one_shot.layers[name].dequantize())


def test_a_layout_that_cannot_meet_an_effective_budget_fails_before_calibration(workspace: tuple[Path, Path]) -> None:
    _, folder = workspace
    # The tiny model's layers are 32..64 wide: four groups of 64-entry fp16 codebooks alone exceed 2 bits.
    cfg = QuantConfig.for_method("rsavq", bits=2, budget="effective", **SMALL)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"cannot meet 2 stored bits per weight.*needs \d"):
        quantize_model(str(folder), cfg, progress=lambda *a: pytest.fail("calibration started"))
    assert time.perf_counter() - started < patience(30)
