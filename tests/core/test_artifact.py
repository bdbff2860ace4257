"""Packed checkpoint: save -> read round trips, metadata, tied weights, and every validation error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kernels.packing import pack_codes
from rsavq_core.checkpoint.packed import WEIGHTS_FILE, read_checkpoint, save_checkpoint
from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.errors import ArtifactError, ConfigError
from rsavq_core.formats.base import QuantizedLayer
from rsavq_core.formats.outliers import Outliers
from rsavq_core.formats.scalar import ScalarLayer
from rsavq_core.formats.vq_layer import VQGroup, VQLayer


def make_vq_layer(
    m: int,
    n: int,
    vector_len: int,
    n_pq: int,
    group_bits: list[int],
    *,
    bias: bool = False,
    seed: int = 0,
    row_scales: bool = False,
    outliers: int = 0,
) -> VQLayer:
    """A VQ layer with random perm, codebooks and indices (and row scales and ``outliers`` sparse
    residuals, if asked); groups split the columns evenly."""
    gen = torch.Generator().manual_seed(seed)
    d, n_vectors = vector_len // n_pq, -(-m // vector_len)
    bounds = [round(i * n / len(group_bits)) for i in range(len(group_bits) + 1)]
    groups = []
    for bits, start, stop in zip(group_bits, bounds[:-1], bounds[1:], strict=True):
        k = 2 ** (bits * d)
        codebooks = (torch.randn(n_pq, k, d, generator=gen) * 0.1).to(torch.float16)
        indices = torch.randint(0, k, (stop - start, n_vectors, n_pq), generator=gen)
        groups.append(VQGroup(bits, start, stop, codebooks, indices))
    perm = torch.randperm(n, generator=gen)
    b = (torch.randn(m, generator=gen) * 0.1).to(torch.float16) if bias else None
    scale = (torch.rand(m, generator=gen) * 3 + 0.05).to(torch.float16) if row_scales else None
    sparse = None
    if outliers:
        index = torch.randperm(m * n, generator=gen)[:outliers].sort().values
        sparse = Outliers(index, (torch.randn(outliers, generator=gen) * 0.5).to(torch.float16))
    return VQLayer(m, n, vector_len, n_pq, perm, groups, b, scale, sparse)


def make_scalar_layer(m: int, n: int, bits: int, group_size: int, *, bias: bool = False, seed: int = 0) -> ScalarLayer:
    gen = torch.Generator().manual_seed(seed)
    n_groups = -(-n // group_size)
    codes = torch.randint(0, 2**bits, (m, n), generator=gen).to(torch.uint8)
    scales = (torch.rand(m, n_groups, generator=gen) * 0.02 + 0.001).to(torch.float16)
    zeros = torch.randint(0, 2**bits, (m, n_groups), generator=gen).to(torch.float16)
    b = (torch.randn(m, generator=gen) * 0.1).to(torch.float16) if bias else None
    return ScalarLayer(m, n, bits, group_size, codes, scales, zeros, b)


def tiny_layers(model: torch.nn.Module) -> dict[str, QuantizedLayer]:
    """VQ and scalar layers for some linears of the tiny LLaMA (k_proj: 24 rows, not a multiple of 5)."""
    return {
        "model.layers.0.self_attn.q_proj": make_vq_layer(48, 48, 4, 2, [2, 1, 3], bias=True, seed=1, outliers=7),
        "model.layers.0.self_attn.k_proj": make_vq_layer(24, 48, 5, 1, [1, 2], seed=2, row_scales=True),
        "model.layers.1.mlp.down_proj": make_scalar_layer(48, 96, 3, 40, bias=True, seed=3),
        "model.layers.1.mlp.up_proj": make_scalar_layer(96, 48, 4, 16, seed=4),
    }


def assert_same_layer(a: QuantizedLayer, b: QuantizedLayer) -> None:
    assert type(a) is type(b)
    assert (a.out_features, a.in_features) == (b.out_features, b.in_features)
    assert (a.bias is None) == (b.bias is None)
    if a.bias is not None:
        assert b.bias is not None and torch.equal(a.bias, b.bias)
    if isinstance(a, VQLayer):
        assert isinstance(b, VQLayer)
        assert (a.vector_len, a.n_pq) == (b.vector_len, b.n_pq)
        assert torch.equal(a.perm, b.perm)
        assert len(a.groups) == len(b.groups)
        for ga, gb in zip(a.groups, b.groups, strict=True):
            assert (ga.bits, ga.start, ga.stop) == (gb.bits, gb.start, gb.stop)
            assert torch.equal(ga.codebooks, gb.codebooks) and gb.codebooks.dtype == torch.float16
            assert torch.equal(ga.indices, gb.indices)
        assert (a.row_scale is None) == (b.row_scale is None)
        if a.row_scale is not None:
            assert b.row_scale is not None
            assert torch.equal(a.row_scale, b.row_scale) and b.row_scale.dtype == torch.float16
        assert (a.outliers is None) == (b.outliers is None)
        if a.outliers is not None and b.outliers is not None:
            assert torch.equal(a.outliers.index, b.outliers.index) and torch.equal(a.outliers.value, b.outliers.value)
            assert b.outliers.value.dtype == torch.float16
    else:
        assert isinstance(a, ScalarLayer) and isinstance(b, ScalarLayer)
        assert (a.bits, a.group_size) == (b.bits, b.group_size)
        for field in ("codes", "scales", "zeros"):
            assert torch.equal(getattr(a, field), getattr(b, field))
    assert torch.equal(a.dequantize(), b.dequantize())


@pytest.fixture
def saved(tmp_path: Path, tiny_llama: Any) -> tuple[Path, dict[str, QuantizedLayer]]:
    model, tokenizer = tiny_llama
    layers = tiny_layers(model)
    out = save_checkpoint(
        tmp_path / "ckpt",
        model=model,
        tokenizer=tokenizer,
        layers=layers,
        config=QuantConfig.for_method("rsavq"),
        source_model="tiny-llama",
        extra_metadata={"quantize_seconds": "1.5"},
    )
    return out, layers


def rewrite(
    file: Path, *, metadata: dict[str, str] | None = None, tensors: dict[str, torch.Tensor] | None = None
) -> None:
    """Rewrite a safetensors file with some metadata entries / tensors replaced."""
    with safe_open(str(file), framework="pt") as fh:
        meta = dict(fh.metadata())
    data = load_file(str(file))
    meta.update(metadata or {})
    data.update(tensors or {})
    save_file(data, str(file), metadata=meta)


def test_round_trip(saved: tuple[Path, dict[str, QuantizedLayer]], tiny_llama: Any) -> None:
    out, layers = saved
    assert (out / "config.json").is_file() and (out / WEIGHTS_FILE).is_file()
    assert (out / "tokenizer_config.json").is_file() or (out / "tokenizer.json").is_file()
    art = read_checkpoint(out)
    assert art.config == QuantConfig.for_method("rsavq")
    assert art.metadata["format"] == "rsavq" and art.metadata["format_version"] == "2"
    assert art.metadata["method"] == "rsavq" and art.metadata["source_model"] == "tiny-llama"
    assert art.metadata["quantize_seconds"] == "1.5"
    assert set(art.layers) == set(layers)
    for name, layer in layers.items():
        assert_same_layer(layer, art.layers[name])
    q, s = art.packed["model.layers.0.self_attn.q_proj"], art.packed["model.layers.1.mlp.down_proj"]
    assert set(q) == {"g0_indices", "g1_indices", "g2_indices"} and set(s) == {"codes"}
    q_layer = layers["model.layers.0.self_attn.q_proj"]
    assert isinstance(q_layer, VQLayer)
    g1 = q_layer.groups[1]
    assert torch.equal(q["g1_indices"], pack_codes(g1.indices, 2))
    # Non-quantized state: fp16, quantized linears' weights absent, the tied lm_head stored once.
    model, _ = tiny_llama
    state = model.state_dict()
    assert art.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in art.other_state
    for name in layers:
        assert f"{name}.weight" not in art.other_state
    expected = {k for k in state if k != "lm_head.weight" and not k.startswith(tuple(layers))}
    assert set(art.other_state) == expected
    emb = art.other_state["model.embed_tokens.weight"]
    assert emb.dtype == torch.float16
    assert torch.equal(emb, state["model.embed_tokens.weight"].half())


def test_tensor_names_and_dtypes(saved: tuple[Path, dict[str, QuantizedLayer]]) -> None:
    out, _ = saved
    data = load_file(str(out / WEIGHTS_FILE))
    q = "model.layers.0.self_attn.q_proj"
    assert data[f"{q}.perm"].dtype == torch.int16
    assert data[f"{q}.g2.codebooks"].shape == (2, 2 ** (3 * 2), 2)
    assert data[f"{q}.g0.indices"].dtype == torch.int32 and data[f"{q}.g0.indices"].dim() == 1
    assert data[f"{q}.bias"].dtype == torch.float16
    s = "model.layers.1.mlp.down_proj"
    assert data[f"{s}.codes"].dtype == torch.int32 and data[f"{s}.codes"].numel() == -(-48 * 96 * 3 // 32)
    assert data[f"{s}.scales"].shape == (48, 3)
    with safe_open(str(out / WEIGHTS_FILE), framework="pt") as fh:
        manifest = json.loads(fh.metadata()["layers"])
    assert manifest[q]["groups"][1] == {"bits": 1, "start": 16, "stop": 32}
    k = "model.layers.0.self_attn.k_proj"  # the layer with row scales
    assert manifest[k]["row_scales"] is True and "row_scales" not in manifest[q]
    assert data[f"{k}.row_scale"].dtype == torch.float16 and data[f"{k}.row_scale"].shape == (24,)
    assert f"{q}.row_scale" not in data
    assert manifest[q]["outliers"] == 7 and "outliers" not in manifest[k]
    assert data[f"{q}.outlier_index"].dtype == torch.int32 and data[f"{q}.outlier_value"].shape == (7,)
    assert manifest[s] == {
        "kind": "scalar",
        "out_features": 48,
        "in_features": 96,
        "has_bias": True,
        "bits": 3,
        "group_size": 40,
    }


def test_save_replaces_existing_dir_atomically(saved: tuple[Path, dict[str, QuantizedLayer]], tiny_llama: Any) -> None:
    out, _ = saved
    model, tokenizer = tiny_llama
    layers: dict[str, QuantizedLayer] = {"model.layers.0.mlp.gate_proj": make_scalar_layer(96, 48, 2, 48, seed=9)}
    save_checkpoint(
        out,
        model=model,
        tokenizer=None,
        layers=layers,
        config=QuantConfig.for_method("rtn", bits=2),
        source_model="tiny-llama",
    )
    art = read_checkpoint(out)
    assert set(art.layers) == set(layers) and art.config.method == "rtn"
    assert sorted(p.name for p in out.parent.iterdir()) == ["ckpt"]  # no temp or backup dirs left


def test_reserved_or_non_string_extra_metadata(tmp_path: Path, tiny_llama: Any) -> None:
    model, tokenizer = tiny_llama
    extras: tuple[dict[str, Any], ...] = ({"format": "x"}, {"seconds": 1.5})  # Any: a non-string value on purpose
    for extra in extras:
        with pytest.raises(ConfigError):
            save_checkpoint(
                tmp_path / "c",
                model=model,
                tokenizer=tokenizer,
                layers={},
                config=QuantConfig(),
                source_model="m",
                extra_metadata=extra,
            )
    assert not (tmp_path / "c").exists()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no packed checkpoint"):
        read_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.001])
def test_truncated_file(saved: tuple[Path, dict[str, QuantizedLayer]], keep: float) -> None:
    file = saved[0] / WEIGHTS_FILE
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ArtifactError, match="truncated or corrupt") as info:
        read_checkpoint(saved[0])
    assert str(file) in str(info.value)


def test_wrong_format_version(saved: tuple[Path, dict[str, QuantizedLayer]]) -> None:
    rewrite(saved[0] / WEIGHTS_FILE, metadata={"format_version": "7"})
    with pytest.raises(ArtifactError, match=r"unsupported format_version '7'.*reads format_version 1, 2"):
        read_checkpoint(saved[0])


def test_wrong_format(saved: tuple[Path, dict[str, QuantizedLayer]]) -> None:
    rewrite(saved[0] / WEIGHTS_FILE, metadata={"format": "gguf"})
    with pytest.raises(ArtifactError, match="not an rsavq checkpoint"):
        read_checkpoint(saved[0])


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("field", "tensor", "message"),
    [
        (
            "g0.codebooks",
            torch.zeros(2, 8, 2, dtype=torch.float16),
            r"g0\.codebooks: shape \(2, 8, 2\), expected \(2, 16, 2\)",
        ),
        ("perm", torch.arange(47, dtype=torch.int16), r"perm: shape \(47,\), expected \(48,\)"),
        ("perm", torch.zeros(48, dtype=torch.int16), "perm: is not a permutation"),
        ("g1.indices", torch.zeros(3, dtype=torch.int32), r"g1\.indices: 3 packed words"),
        ("bias", torch.zeros(48, dtype=torch.float32), "bias: dtype torch.float32"),
    ],
)
def test_inconsistent_tensors(
    saved: tuple[Path, dict[str, QuantizedLayer]], field: str, tensor: torch.Tensor, message: str
) -> None:
    rewrite(saved[0] / WEIGHTS_FILE, tensors={f"{Q}.{field}": tensor})
    with pytest.raises(ArtifactError, match=message) as info:
        read_checkpoint(saved[0])
    assert f"layer {Q}" in str(info.value)


def test_inconsistent_manifest(saved: tuple[Path, dict[str, QuantizedLayer]]) -> None:
    file = saved[0] / WEIGHTS_FILE
    with safe_open(str(file), framework="pt") as fh:
        manifest = json.loads(fh.metadata()["layers"])
    manifest[Q]["groups"][1]["start"] = 17  # leaves a hole between groups 0 and 1
    rewrite(file, metadata={"layers": json.dumps(manifest)})
    with pytest.raises(ArtifactError, match=r"groups\[1\]: columns \[17, 32\)"):
        read_checkpoint(saved[0])


def test_outlier_positions_must_increase(saved: tuple[Path, dict[str, QuantizedLayer]]) -> None:
    unordered = torch.tensor([5, 3, 9, 10, 11, 12, 13], dtype=torch.int32)
    rewrite(saved[0] / WEIGHTS_FILE, tensors={f"{Q}.outlier_index": unordered})
    with pytest.raises(ArtifactError, match="outlier_index: positions must increase strictly"):
        read_checkpoint(saved[0])


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ("model.layers.1.mlp.up_proj.scales", "layer model.layers.1.mlp.up_proj: scales: tensor .* is missing"),
        ("model.layers.0.self_attn.k_proj.row_scale", "k_proj: row_scale: tensor .* is missing"),  # declared
    ],
)
def test_missing_layer_tensor(saved: tuple[Path, dict[str, QuantizedLayer]], tensor: str, message: str) -> None:
    file = saved[0] / WEIGHTS_FILE
    with safe_open(str(file), framework="pt") as fh:
        meta = dict(fh.metadata())
    data = load_file(str(file))
    del data[tensor]
    save_file(data, str(file), metadata=meta)
    with pytest.raises(ArtifactError, match=message):
        read_checkpoint(saved[0])
