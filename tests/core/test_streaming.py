"""Streaming a model block by block: the same packed bytes as loading it whole, with one block of
weights in memory, activations spilled past their budget, and bad input refused before heavy work."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from rsavq_core.calibration import streamed as streamed_calibration
from rsavq_core.calibration.activations import ActivationStore, check_offload_dir
from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.errors import ConfigError, ModelResolutionError
from rsavq_core.models import memory
from rsavq_core.models.streamed import StreamedModel
from rsavq_core.models.weights import INDEX_FILE, WeightFiles
from rsavq_core.pipeline.placement import Placement, resolve_device
from rsavq_core.pipeline.quantize import quantize_model
from rsavq_core.settings import override

CALIB: dict[str, Any] = dict(calib_samples=4, calib_len=16)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def sha256(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Any, one_thread: None) -> Path:
    """The tiny LLaMA saved in several safetensors shards with an index."""
    model, tokenizer = tiny_llama
    folder = tmp_path_factory.mktemp("streaming") / "tiny"
    model.save_pretrained(folder, max_shard_size="300KB")
    tokenizer.save_pretrained(folder)
    assert (folder / INDEX_FILE).is_file() and len(list(folder.glob("*.safetensors"))) >= 2
    return folder


def quantize_both(folder: Path, cfg: QuantConfig, root: Path, device: str = "cpu") -> tuple[Any, Any]:
    """(whole run, streamed run), each with its own statistics cache so neither reuses the other's."""
    runs = []
    for stream in (False, True):
        name = "stream" if stream else "whole"
        with override(cache_dir=root / f"cache-{name}"):
            placement = Placement(device=resolve_device(device), stream=stream)
            runs.append(quantize_model(str(folder), cfg, out_dir=root / name, placement=placement))
    return runs[0], runs[1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "method,knobs",
    [
        ("gptq", {}),
        ("rsavq", dict(kmeans_iters=2, n_groups=2)),  # gradients, Fisher, shared codebooks, block fine-tuning
        ("gptq", dict(calib_inputs="quantized")),  # sequential Hessians: the walker over streamed blocks
    ],
)
def test_streamed_checkpoint_is_byte_identical(
    sharded: Path, tmp_path: Path, method: str, knobs: dict[str, Any], device: str
) -> None:
    cfg = QuantConfig.for_method(method, bits=2, **CALIB, **knobs)
    whole, streamed = quantize_both(sharded, cfg, tmp_path, device)
    assert streamed.model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"  # really streamed
    assert whole.model.model.layers[0].self_attn.q_proj.weight.device.type == "cpu"
    assert sha256(tmp_path / "stream") == sha256(tmp_path / "whole")


def test_a_head_gradient_taken_a_few_positions_at_a_time_gives_the_same_bytes(
    sharded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 5 x 4 sequences' logits per chunk: a few positions, where whole sequences would fit in one
    monkeypatch.setattr(memory, "HEAD_CHUNK_LOGITS", 5 * 4 * 49152)
    calls = []
    original = streamed_calibration.head_logits

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(args[1].shape[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(streamed_calibration, "head_logits", counted)
    cfg = QuantConfig.for_method("rsavq", bits=2, kmeans_iters=2, n_groups=2, **CALIB)
    quantize_both(sharded, cfg, tmp_path)
    assert len(calls) >= 3 and max(calls) < CALIB["calib_len"] - 1  # really in pieces
    assert sha256(tmp_path / "stream") == sha256(tmp_path / "whole")


def test_bundled_model_streamed_equals_whole(smol_dir: Path, tmp_path: Path) -> None:
    """The issue's check on the real model: GPTQ 4-bit g128, the same sha256 either way."""
    cfg = QuantConfig.for_method("gptq", bits=4, group_size=128, calib_samples=4, calib_len=64)
    whole, streamed = quantize_both(smol_dir, cfg, tmp_path)
    digests = sha256(tmp_path / "stream")
    assert digests == sha256(tmp_path / "whole")
    assert streamed.stats_cached is False and whole.stats_cached is False


def test_streamed_model_holds_one_block(sharded: Path, tiny_llama: Any) -> None:
    model, _ = tiny_llama
    streamed = StreamedModel(sharded, device=torch.device("cpu"))
    assert streamed.materialized_bytes() == 0
    streamed.load_rest()
    rest = streamed.materialized_bytes()
    embed = model.model.embed_tokens.weight
    assert rest >= embed.numel() * 4  # tied head: stored once
    assert streamed.model.lm_head.weight is streamed.model.model.embed_tokens.weight
    with streamed.block(1) as block:
        inside = streamed.materialized_bytes()
        block_bytes = sum(p.numel() * 4 for p in model.model.layers[1].parameters())
        assert inside == rest + block_bytes
        assert torch.equal(block.get_parameter("mlp.down_proj.weight"), model.model.layers[1].mlp.down_proj.weight)
    norms = sum(p.numel() * 4 for n, p in model.model.layers[1].named_parameters() if "norm" in n)
    assert streamed.materialized_bytes() == rest + norms  # the linears went back to the meta device


def test_missing_shard_and_index_lies_are_clear_errors(sharded: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in sharded.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    shard = sorted(broken.glob("*.safetensors"))[0]
    shard.rename(shard.with_suffix(".gone"))
    with pytest.raises(ModelResolutionError, match="shards that are not there.*" + shard.name):
        WeightFiles.open(broken)
    shard.with_suffix(".gone").rename(shard)
    index = json.loads((broken / INDEX_FILE).read_text())
    index["weight_map"]["model.layers.0.mlp.not_a_tensor.weight"] = shard.name
    (broken / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ModelResolutionError, match="do not hold.*not_a_tensor"):
        WeightFiles.open(broken)
    cfg = QuantConfig.for_method("gptq", bits=4, **CALIB)
    with pytest.raises(ModelResolutionError, match="not_a_tensor"):
        quantize_model(str(broken), cfg, placement=Placement(stream=True))


def test_activations_spill_past_the_budget_and_are_removed(tmp_path: Path) -> None:
    store = ActivationStore(budget_bytes=1000, offload_dir=tmp_path / "offload", device=torch.device("cpu"))
    small, big = [torch.randn(2, 3, 4)], [torch.randn(2, 8, 16), torch.randn(1, 8, 16)]
    store.put(0, small)
    store.put(1, big)  # 1536 bytes: past the budget
    assert store.held_bytes == small[0].numel() * 4 and store.spilled_bytes == sum(t.numel() * 4 for t in big)
    files = list((tmp_path / "offload").rglob("boundary_*"))
    assert len(files) == 1
    assert all(torch.equal(a, b) for a, b in zip(store.get(1), big, strict=True))
    store.drop(1)
    assert not files[0].exists()
    store.close()
    assert list((tmp_path / "offload").iterdir()) == []


def test_the_boundaries_read_last_go_to_disk_first(tmp_path: Path) -> None:
    boundaries = [[torch.randn(2, 4, 8), torch.randn(1, 4, 8).bfloat16()] for _ in range(5)]
    size = sum(t.numel() * t.element_size() for t in boundaries[0])
    store = ActivationStore(budget_bytes=2 * size, offload_dir=tmp_path / "offload", device=torch.device("cpu"))
    for key, tensors in enumerate(boundaries):
        store.put(key, tensors)
        assert store.held_bytes <= 2 * size  # a gradient pass's forward: memory stays at two boundaries
    assert store.spilled_bytes == 3 * size and len(list((tmp_path / "offload").rglob("boundary_*"))) == 3
    for key in reversed(range(5)):  # the backward pass: last boundary first
        back = store.get(key)
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(back, boundaries[key], strict=True))
        store.drop(key)
    store.close()
    assert list((tmp_path / "offload").iterdir()) == []


def test_spilled_statistics_equal_held_ones(sharded: Path, tmp_path: Path) -> None:
    cfg = QuantConfig.for_method("rsavq", bits=2, kmeans_iters=2, n_groups=2, **CALIB)
    digests = []
    for budget in (4.0 * 2**30, 0.0):
        out = tmp_path / f"budget-{budget:g}"
        placement = Placement(stream=True, activation_budget_bytes=budget, offload_dir=tmp_path / "offload")
        with override(cache_dir=out / "cache"):
            result = quantize_model(str(sharded), cfg, out_dir=out / "packed", placement=placement)
        assert result.stats_cached is False
        digests.append(sha256(out / "packed"))
    assert digests[0] == digests[1]
    assert not any((tmp_path / "offload").rglob("boundary_*"))  # spilled files are cleaned up


def test_a_bf16_streamed_run_keeps_its_statistics_apart(sharded: Path, tmp_path: Path) -> None:
    cfg = QuantConfig.for_method("rsavq", bits=2, kmeans_iters=2, n_groups=2, **CALIB)
    with override(cache_dir=tmp_path / "cache"):
        for dtype in ("float32", "bfloat16"):
            placement = Placement(stream=True, compute_dtype=dtype)
            result = quantize_model(str(sharded), cfg, out_dir=tmp_path / dtype, placement=placement)
            assert result.stats_cached is False  # the float32 statistics are not the bf16 run's
    metas = [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("meta.json")]
    assert sorted(m["compute_dtype"] for m in metas if "with_grads" in m) == ["bfloat16", "float32"]
    assert sha256(tmp_path / "bfloat16") != sha256(tmp_path / "float32")


def test_bad_placements_fail_before_heavy_work(sharded: Path, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="not a device name"):
        resolve_device("gpu please")
    with pytest.raises(ConfigError, match="only cpu and cuda"):
        resolve_device("mps")
    with pytest.raises(ConfigError, match="compute dtype 'float16'"):
        Placement(compute_dtype="float16")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        check_offload_dir(not_a_dir / "sub", 1.0)
    with pytest.raises(ConfigError, match="GiB free"):
        check_offload_dir(tmp_path, 1e18)
    cfg = QuantConfig.for_method("gptq", bits=4, **CALIB, model_finetune_steps=2)
    with pytest.raises(ConfigError, match="needs it in memory"):
        quantize_model(str(sharded), cfg, placement=Placement(stream=True))


@pytest.mark.parametrize("method,knobs", [("gptq", {}), ("rsavq", dict(kmeans_iters=2, n_groups=2))])
def test_a_block_limit_quantizes_the_first_blocks_as_a_whole_run_does(
    sharded: Path, tmp_path: Path, method: str, knobs: dict[str, Any]
) -> None:
    cfg = QuantConfig.for_method(method, bits=2, **CALIB, **knobs)
    with override(cache_dir=tmp_path / "limited"):
        limited = quantize_model(str(sharded), cfg, placement=Placement(stream=True), blocks=1)
        with pytest.raises(ConfigError, match="block limit"):
            quantize_model(str(sharded), cfg, out_dir=tmp_path / "x", blocks=1)
    with override(cache_dir=tmp_path / "full"):
        full = quantize_model(str(sharded), cfg, placement=Placement(stream=True))
    assert sorted(limited.layers) == sorted(n for n in full.layers if n.startswith("model.layers.0."))
    for name in limited.layers:
        assert torch.equal(limited.layers[name].dequantize(), full.layers[name].dequantize()), name
    assert not any((tmp_path / "limited" / "stats").glob("*/meta.json"))  # a partial store is never reused


def test_a_dry_run_prints_the_estimate_and_runs_nothing(
    sharded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    with override(cache_dir=tmp_path / "cache"):
        code = main(["quantize", str(sharded), "--method", "gptq", "--bits", "4", "--dry-run", "--quiet"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["streamed"] is True and report["device"] == "cpu" and report["host_gib"] > 0
    assert report["peak_phase"] in ("statistics", "quantize", "save")
    assert report["coverage"]["share"] > 0.99 and report["coverage"]["kept_float"] == {}  # tied head: outside blocks
    assert not (tmp_path / "cache" / "stats").exists()  # nothing was calibrated
    if not torch.cuda.is_available():
        assert main(["quantize", str(sharded), "--method", "gptq", "--bits", "4", "--dry-run", "--device", "cuda"]) != 0
        assert "no CUDA device" in capsys.readouterr().err


def test_a_streamed_float_model_gives_the_whole_models_logits_and_perplexity(sharded: Path, tiny_llama: Any) -> None:
    from rsavq_core.evaluation.perplexity import perplexity
    from rsavq_core.runtime.streamed_lm import StreamedCausalLM

    model, tokenizer = tiny_llama
    streamed = StreamedCausalLM(sharded, torch.device("cpu"))
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row, as zero-shot scoring batches them
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, model(ids).logits)
        torch.testing.assert_close(streamed(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    assert streamed._streamed.materialized_bytes() < sum(p.numel() * 4 for p in model.parameters())
    whole = perplexity(model, tokenizer, n_windows=2, length=32)
    assert perplexity(streamed, tokenizer, n_windows=2, length=32)["ppl"] == whole["ppl"]


def test_hessians_computed_as_the_run_goes_give_the_stored_ones_bytes(sharded: Path, tmp_path: Path) -> None:
    """Past RSAVQ_STATS_CACHE_GB a Hessian-only streamed run stores no statistics: same bytes, nothing cached."""
    cfg = QuantConfig.for_method("gptq", bits=2, **CALIB)
    digests = []
    for limit in (20.0, 0.0):
        out = tmp_path / f"limit-{limit:g}"
        with override(cache_dir=out / "cache", stats_cache_gb=limit):
            quantize_model(str(sharded), cfg, out_dir=out / "packed", placement=Placement(stream=True))
        digests.append(sha256(out / "packed"))
    assert digests[0] == digests[1]
    assert any((tmp_path / "limit-20" / "cache" / "stats").glob("*/meta.json"))
    assert not (tmp_path / "limit-0" / "cache" / "stats").exists()


def test_a_statistics_store_the_disk_cannot_take_is_refused_with_the_figures() -> None:
    from rsavq_core.pipeline.calibration import _check_cache_room

    with pytest.raises(ConfigError, match=r"take .* GiB .* which has .* GiB free"):
        _check_cache_room(1e18)


@pytest.mark.parametrize("stats_cache_gb", [20.0, 0.0])  # statistics stored first / computed as the run goes
def test_a_streamed_block_releases_each_linear_once_it_is_quantized(
    sharded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stats_cache_gb: float
) -> None:
    """The float linears of a block do not all stay until its end: when its down projection is
    quantized, the block's other float linears are gone (an 8B block's 0.6 GB)."""
    import rsavq_core.pipeline.blocks as blocks_module

    current: dict[str, torch.nn.Module] = {}
    open_block = StreamedModel.block

    @contextlib.contextmanager
    def tracked(self: StreamedModel, index: int, drop: list[str] | None = None) -> Iterator[torch.nn.Module]:
        with open_block(self, index, drop) as block:
            current["block"] = block
            yield block

    in_memory: list[int] = []
    quantize_layer = blocks_module.quantize_layer

    def counting(*args: Any, **kwargs: Any) -> Any:
        linears = [m for m in current["block"].modules() if isinstance(m, torch.nn.Linear)]
        in_memory.append(sum(m.weight.device.type != "meta" for m in linears))
        return quantize_layer(*args, **kwargs)

    monkeypatch.setattr(StreamedModel, "block", tracked)
    monkeypatch.setattr(blocks_module, "quantize_layer", counting)
    with override(cache_dir=tmp_path / "cache", stats_cache_gb=stats_cache_gb):
        quantize_model(str(sharded), QuantConfig.for_method("gptq", bits=2, **CALIB), placement=Placement(stream=True))
    per_block = 7  # q, k, v, o, gate, up, down
    assert in_memory[:per_block] == list(range(per_block, 0, -1))
    assert in_memory[per_block : 2 * per_block] == list(range(per_block, 0, -1))
