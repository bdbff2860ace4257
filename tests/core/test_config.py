"""QuantConfig: validation messages, method presets, derived per-group bit clamps, serialisation."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest

from rsavq_core.algorithms.vq_options import VQOptions
from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.errors import ConfigError
from rsavq_core.methods.registry import method_names


def vq(**knobs: Any) -> QuantConfig:
    """An RSAVQ config from flat knobs (the shared ones and the method's options)."""
    return QuantConfig.for_method("rsavq", **knobs)


def bit_range(cfg: QuantConfig) -> tuple[int, int]:
    return cfg.options_as(VQOptions).group_bit_range(cfg.bits)


@pytest.mark.parametrize("bits", [0.5, 9, 8.5, -1])
def test_bits_out_of_range_names_the_range(bits: float) -> None:
    with pytest.raises(ConfigError, match=r"bits must lie in \[1, 8\]"):
        QuantConfig(bits=bits)


@pytest.mark.parametrize("bits", [math.nan, math.inf, -math.inf, "2"])
def test_bits_not_a_finite_number(bits: object) -> None:
    with pytest.raises(ConfigError, match="bits must be a number"):
        QuantConfig(bits=bits)  # type: ignore[arg-type]


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        QuantConfig(bits=0.5)


def test_vector_len_not_divisible_by_n_pq() -> None:
    with pytest.raises(ConfigError, match="not divisible") as info:
        vq(vector_len=5, n_pq=2)
    assert "vector_len 5" in str(info.value) and "n_pq 2" in str(info.value)
    # The same numbers are fine when they divide.
    assert vq(vector_len=6, n_pq=2).options_as(VQOptions).sub_dim == 3
    assert vq(vector_len=5, n_pq=1).options_as(VQOptions).sub_dim == 5


def test_unknown_method_lists_the_choices() -> None:
    for make in (lambda: QuantConfig(method="awq"), lambda: QuantConfig.for_method("awq")):
        with pytest.raises(ConfigError) as info:
            make()
        message = str(info.value)
        assert "'awq'" in message
        for method in method_names():
            assert method in message


@pytest.mark.parametrize(
    "field,value",
    [
        ("allocation", "greedy"),
        ("metric", "cosine"),
        ("fisher", "diag"),
        ("sensitivity", "both"),
        ("assign", "nearest"),
        ("lam_scale", "log"),
    ],
)
def test_unknown_choice_lists_the_choices(field: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown {field} '{value}'; choose one of"):
        vq(**{field: value})


@pytest.mark.parametrize("field", ["vector_len", "n_pq", "n_groups", "kmeans_iters", "calib_samples", "group_size"])
@pytest.mark.parametrize("value", [0, -3, 2.0, True])
def test_integer_fields_must_be_positive_integers(field: str, value: Any) -> None:
    method = "rtn" if field == "group_size" else "rsavq"
    with pytest.raises(ConfigError, match=rf"{field} must be (a positive integer|an integer in \[1, \d+\])"):
        QuantConfig.for_method(method, **{field: value})


@pytest.mark.parametrize(
    "overrides", [{"lam": -0.1}, {"lam": 11.0}, {"damping": 0.0}, {"hessian_damping": -1.0}, {"calib_len": 1}]
)
def test_other_ranges(overrides: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        vq(**overrides)


@pytest.mark.parametrize("bits,vector_len,n_pq", [(6, 6, 2), (3, 6, 1), (5, 8, 2), (2.5, 8, 1)])
def test_vq_codebook_above_2_to_16_entries_is_rejected(bits: float, vector_len: int, n_pq: int) -> None:
    d = vector_len // n_pq
    assert bits * d > 16
    with pytest.raises(ConfigError):
        vq(bits=bits, vector_len=vector_len, n_pq=n_pq)
    # The scalar methods have no codebook: the same bits are fine for them (integer bits only).
    if bits == int(bits):
        assert QuantConfig.for_method("gptq", bits=bits).bits == bits


def test_largest_codebook_allowed_is_2_to_16() -> None:
    cfg = vq(bits=4, vector_len=8, n_pq=2)  # 4 bits x d=4 = 16-bit indices
    assert cfg.bits * cfg.options_as(VQOptions).sub_dim == 16


def test_codebook_size_error_explains_the_codebook() -> None:
    with pytest.raises(ConfigError, match="codebooks of"):
        vq(bits=6, vector_len=6, n_pq=2)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_scalar_methods_need_integer_bits(method: str) -> None:
    with pytest.raises(ConfigError, match="needs integer bits"):
        QuantConfig.for_method(method, bits=2.5)
    assert QuantConfig.for_method(method, bits=3).bits == 3


def test_vq_methods_accept_fractional_bits() -> None:
    assert QuantConfig(bits=2.5).bits == 2.5


def test_explicit_clamps_are_validated() -> None:
    with pytest.raises(ConfigError, match="exceeds"):
        vq(bits=2, min_group_bits=3, max_group_bits=2)
    with pytest.raises(ConfigError, match="outside the per-group range"):
        vq(bits=2, min_group_bits=3, max_group_bits=4, share_codebooks=False)
    with pytest.raises(ConfigError, match="sub-vectors of 6 allow at most 2"):  # shared 2^12-entry codebooks
        vq(bits=2, min_group_bits=3, max_group_bits=4)
    assert bit_range(vq(bits=2, min_group_bits=2, max_group_bits=3, share_codebooks=False)) == (2, 3)


def test_presets() -> None:
    km = QuantConfig.for_method("kmeans")
    assert km.method == "kmeans"
    o = km.options_as(VQOptions)
    assert o.lam == 0.0 and o.allocation == "uniform" and o.metric == "euclidean" and o.compensate is False
    assert not km.needs_gradients() and not km.needs_hessian() and not km.needs_calibration()
    rs = QuantConfig.for_method("rsavq")
    assert rs == QuantConfig()
    o = rs.options_as(VQOptions)
    assert o.lam == 0.05 and o.allocation == "uniform" and o.metric == "fisher_diag"
    assert o.compensate and o.refit == "output" and rs.block_finetune_steps == 64
    assert rs.needs_gradients() and rs.needs_hessian()
    assert km.block_finetune_steps == 0 and km.options_as(VQOptions).refit == "mean"  # the baseline
    assert QuantConfig.for_method("rsavq", block_finetune_steps=0).block_finetune_steps == 0
    gptq = QuantConfig.for_method("gptq", bits=3)
    assert not gptq.needs_gradients() and gptq.needs_hessian() and gptq.block_finetune_steps == 0
    assert not QuantConfig.for_method("rtn", bits=3).needs_calibration()
    # Explicit overrides win over the preset.
    km2 = QuantConfig.for_method("kmeans", lam=0.1, compensate=True)
    o = km2.options_as(VQOptions)
    assert o.lam == 0.1 and o.compensate and o.allocation == "uniform"
    assert km2.needs_gradients() and km2.needs_hessian()


# Per layer, at 1 bit the derived sub-vectors are 6 long, so 2 bits per weight is already a
# 2^12-entry codebook; shared codebooks are 2^12 entries at --bits already (uniform bits: the cap
# only matters for explicit clamps).
@pytest.mark.parametrize(
    "bits,shared,expected",
    [(2, False, (1, 4)), (2.5, False, (1, 4)), (3, False, (1, 5)), (1, False, (1, 2))]
    + [(2, True, (1, 2)), (3, True, (1, 4))],
)
def test_group_bit_range_defaults(bits: float, shared: bool, expected: tuple[int, int]) -> None:
    assert bit_range(vq(bits=bits, share_codebooks=shared)) == expected


@pytest.mark.parametrize(
    "knobs,layout",
    [
        # (share_codebooks, vector_len, n_pq, n_groups, outliers)
        ({"bits": 2}, (True, 6, 1, 1, 0.0005)),  # 2^12 entries of 12 / bits dimensions
        ({"bits": 3}, (True, 4, 1, 1, 0.0005)),
        ({"bits": 4}, (True, 3, 1, 1, 0.0005)),
        ({"bits": 2.5}, (False, 6, 3, 4, 0.0005)),  # fractional bits: codebook sizes differ per layer
        ({"bits": 5}, (False, 6, 6, 4, 0.0005)),  # 5 does not divide 12
        ({"bits": 2, "allocation": "proportional"}, (False, 6, 2, 4, 0.0005)),
        ({"bits": 2, "budget": "effective"}, (False, 6, 2, 4, 0.0005)),
        ({"bits": 2, "calib_inputs": "quantized"}, (False, 6, 2, 4, 0.0005)),
        ({"bits": 2, "vector_len": 8}, (False, 8, 4, 4, 0.0005)),  # a layout of the user's own: per layer
        ({"bits": 2, "n_groups": 2}, (False, 6, 2, 2, 0.0005)),
        ({"bits": 2, "share_codebooks": True, "vector_len": 4}, (True, 4, 1, 1, 0.0005)),
        ({"bits": 3, "outliers": 0.0}, (True, 4, 1, 1, 0.0)),
    ],
)
def test_layout_is_derived_from_the_bits_and_the_other_knobs(knobs: dict[str, object], layout: tuple) -> None:
    o = vq(**knobs).options_as(VQOptions)
    assert (o.share_codebooks, o.vector_len, o.n_pq, o.n_groups, o.outliers) == layout
    km = QuantConfig.for_method("kmeans", bits=2).options_as(VQOptions)  # the baseline stays per layer, exact
    assert (km.share_codebooks, km.vector_len, km.n_groups, km.outliers) == (False, 6, 4, 0.0)


def test_a_derived_layout_that_does_not_split_is_refused() -> None:
    with pytest.raises(ConfigError, match="vector_len 4 is not divisible by n_pq 3"):
        vq(bits=3, share_codebooks=True, n_pq=3)  # vector_len derives to 12 / 3 = 4


@pytest.mark.parametrize("bits,n_pq", [(1, 1), (2, 2), (2.5, 3), (3, 3), (4, 6), (8, 6)])
def test_sub_vectors_are_derived_from_the_bits_unless_given(bits: float, n_pq: int) -> None:
    cfg = vq(bits=bits, share_codebooks=False)
    assert cfg.options_as(VQOptions).n_pq == n_pq  # codebooks of at most 64 entries at ceil(bits)
    assert cfg.to_dict()["n_pq"] == n_pq  # recorded as used
    given = 2 if bits <= 5 else 3  # a valid layout that differs from the derived one
    assert vq(bits=bits, n_pq=given, share_codebooks=False).options_as(VQOptions).n_pq == given
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_group_bit_range_at_4_bits() -> None:
    # The spec's example [2, 6] at 4 bits holds when 6-bit groups fit the 2^16 codebook cap (d <= 2) ...
    assert bit_range(vq(bits=4, vector_len=4, n_pq=2)) == (2, 6)
    # ... and the cap 16 // d wins with d = 3 (6 x 3 = 18 index bits would be too many).
    assert bit_range(vq(bits=4, n_pq=2)) == (2, 5)


def test_frozen() -> None:
    cfg = QuantConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.bits = 3  # type: ignore[misc]
    assert cfg.replace(seed=3).seed == 3 and cfg.seed == 0
    # Derived knobs keep their resolved values: 2 bits' shared 6-dim codebooks at 3 bits would be 2^18 entries.
    with pytest.raises(ConfigError, match="2\\^18"):
        cfg.replace(bits=3)


def test_json_round_trip() -> None:
    cfg = QuantConfig.for_method(
        "kmeans", bits=2.5, vector_len=8, n_pq=2, n_groups=3, kmeans_iters=7, min_group_bits=2, seed=11
    )
    text = cfg.to_json()
    data = json.loads(text)
    assert data["method"] == "kmeans" and data["bits"] == 2.5
    back = QuantConfig.from_dict(data)
    assert back == cfg
    assert back.to_json() == text


def test_from_dict_rejects_unknown_fields() -> None:
    data = QuantConfig().to_dict()
    data["bitz"] = 3
    data["zzz"] = 1
    with pytest.raises(ConfigError, match="unknown config field.*bitz, zzz"):
        QuantConfig.from_dict(data)


def test_from_dict_validates_values() -> None:
    with pytest.raises(ConfigError, match="bits must lie"):
        QuantConfig.from_dict({"bits": 12})


def test_a_preset_sets_its_knobs_under_the_explicit_ones() -> None:
    from rsavq_core.config.presets import PRESETS

    fast = QuantConfig.for_method("rsavq", bits=2, preset="fast")
    assert all(fast.to_dict()[k] == v for k, v in PRESETS["fast"].items())
    assert QuantConfig.for_method("rsavq", bits=2, preset="fast", calib_samples=8).calib_samples == 8
    gptq = QuantConfig.for_method("gptq", bits=3, preset="fast")  # only the knobs GPTQ has
    assert gptq.calib_samples == PRESETS["fast"]["calib_samples"]
    with pytest.raises(ConfigError, match="unknown preset 'quick'; presets: fast"):
        QuantConfig.for_method("rsavq", bits=2, preset="quick")


def test_every_numeric_knob_has_both_bounds() -> None:
    """A request must not be able to ask for unbounded work (10**12 k-means rounds, a million windows)."""
    from rsavq_core.config.quant_config import shared_knobs
    from rsavq_core.methods.registry import option_knobs

    every = [*shared_knobs(), *(k for k, _ in option_knobs().values())]
    numeric = [k for k in every if k.base in (int, float) and k.choices is None]
    unbounded = [k.name for k in numeric if k.le is None or (k.ge is None and k.gt is None)]
    assert numeric and not unbounded, unbounded
