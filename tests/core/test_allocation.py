"""WCSG bit allocation: channel rules, sorted groups, per-group bits within the budget and clamps."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rsavq_core.algorithms.allocation import allocate, channel_bits, repair_budget
from rsavq_core.errors import ConfigError


def sizes_of(alloc) -> list[int]:
    return [stop - start for start, stop in alloc.bounds]


def total_bits(alloc) -> int:
    return sum(s * b for s, b in zip(sizes_of(alloc), alloc.bits, strict=True))


def best_total(sizes: list[int], budget: float, lo: int, hi: int) -> int:
    """Largest Σ sizes·bits ≤ budget over non-increasing bits in [lo, hi] (brute force)."""
    best = -1
    for bits in itertools.product(range(lo, hi + 1), repeat=len(sizes)):
        if all(a >= b for a, b in zip(bits, bits[1:])):
            t = sum(s * b for s, b in zip(sizes, bits))
            if t <= budget + 1e-9:
                best = max(best, t)
    return best


# --- channel rules -------------------------------------------------------------------------------


def test_proportional_rule() -> None:
    sens = torch.tensor([3.0, 1.0, 0.0, 15.0])
    bits = channel_bits(sens, 2.0, "proportional")
    logs = torch.log2(sens.double() + 1)
    torch.testing.assert_close(bits, 2.0 * 4 * logs / logs.sum())
    assert float(bits.sum()) == pytest.approx(8.0)
    assert float(bits[2]) == 0.0  # log2(0 + 1) = 0
    # All-zero sensitivity: no information, every channel gets the target.
    torch.testing.assert_close(
        channel_bits(torch.zeros(5), 3.0, "proportional"), torch.full((5,), 3.0, dtype=torch.float64)
    )


def test_additive_rule() -> None:
    sens = torch.tensor([1.0, 4.0, 16.0, 64.0])
    bits = channel_bits(sens, 2.0, "additive")
    # b_c = target + ½(log2 I_c − mean log2 I): log2 I = 0, 2, 4, 6 (mean 3)
    torch.testing.assert_close(bits, torch.tensor([0.5, 1.5, 2.5, 3.5], dtype=torch.float64))
    assert float(bits.mean()) == pytest.approx(2.0)
    # Doubling every I_c changes nothing (scale-free, unlike the proportional rule).
    torch.testing.assert_close(channel_bits(sens * 2, 2.0, "additive"), bits)


def test_unknown_rule() -> None:
    with pytest.raises(ConfigError, match="unknown allocation rule"):
        channel_bits(torch.ones(3), 2.0, "magic")


# --- groups --------------------------------------------------------------------------------------


def test_uniform_keeps_order_and_target() -> None:
    alloc = allocate(None, 8, 2.0, 4, "uniform", 1, 4)
    assert torch.equal(alloc.perm, torch.arange(8))
    assert alloc.bounds == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert alloc.bits == [2, 2, 2, 2] and alloc.average_bits() == 2.0
    # "uniform" ignores a given sensitivity.
    alloc2 = allocate(torch.arange(8.0), 8, 2.0, 4, "uniform", 1, 4)
    assert torch.equal(alloc2.perm, torch.arange(8)) and alloc2.bits == [2, 2, 2, 2]


def test_fractional_target_spreads_bits_non_increasing() -> None:
    alloc = allocate(None, 8, 2.5, 4, "uniform", 1, 4)
    assert alloc.bits == [3, 3, 2, 2]
    assert alloc.average_bits() == 2.5


def test_last_group_smaller_when_groups_do_not_divide() -> None:
    alloc = allocate(torch.rand(10), 10, 2.0, 4, "proportional", 1, 4)
    assert sizes_of(alloc) == [3, 3, 3, 1]
    assert alloc.bounds == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert allocate(None, 10, 2.0, 4, "uniform", 1, 4).average_bits() == 2.0


def test_more_groups_than_channels() -> None:
    alloc = allocate(torch.rand(3), 3, 2.0, 8, "proportional", 1, 4)
    assert sizes_of(alloc) == [1, 1, 1]
    assert alloc.average_bits() == 2.0


@pytest.mark.parametrize("rule", ["proportional", "additive"])
def test_perm_sorts_sensitivity_descending(rule: str) -> None:
    gen = torch.Generator().manual_seed(0)
    sens = torch.rand(24, generator=gen) * 5
    alloc = allocate(sens, 24, 2.0, 4, rule, 1, 4)
    assert sorted(alloc.perm.tolist()) == list(range(24))
    assert alloc.perm.dtype == torch.int64
    ordered = sens[alloc.perm]
    assert bool((ordered[:-1] >= ordered[1:]).all())


def test_ties_keep_original_order() -> None:
    sens = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0, 2.0])
    alloc = allocate(sens, 6, 2.0, 2, "proportional", 1, 4)
    assert alloc.perm.tolist() == [1, 3, 5, 0, 2, 4]


def test_skewed_sensitivity_gives_first_group_more_bits() -> None:
    # Two very sensitive channels, the rest nearly flat: first group gets the most bits, budget kept.
    sens = torch.tensor([0.01, 1000.0, 0.01, 0.01, 1000.0, 0.01, 0.01, 0.01])
    alloc = allocate(sens, 8, 2.0, 4, "proportional", 1, 4)
    assert set(alloc.perm[:2].tolist()) == {1, 4}
    assert alloc.bits[0] == 4 and alloc.bits[-1] == 1
    assert alloc.bits == [4, 2, 1, 1]
    assert alloc.average_bits() == 2.0
    # A milder skew: still more bits first, still exactly on budget.
    mild = torch.tensor([3.0, 3.0, 1.0, 1.0, 1.0, 1.0, 0.1, 0.1])
    alloc = allocate(mild, 8, 2.0, 4, "proportional", 1, 4)
    assert alloc.bits[0] > alloc.bits[-1]
    assert alloc.average_bits() == 2.0


def test_shape_mismatch() -> None:
    with pytest.raises(ConfigError, match="expected \\(8,\\)"):
        allocate(torch.rand(7), 8, 2.0, 4, "proportional", 1, 4)


@pytest.mark.parametrize("rule", ["proportional", "additive", "uniform"])
@pytest.mark.parametrize("target", [1.5, 2.0, 2.5, 3.0, 4.0])
def test_budget_monotonicity_and_clamps_on_random_inputs(rule: str, target: float) -> None:
    gen = torch.Generator().manual_seed(int(target * 10))
    lo, hi = max(1, math.ceil(target) - 2), math.floor(target) + 2
    for trial in range(40):
        groups = 4
        n = groups * int(torch.randint(1, 10, (1,), generator=gen))  # equal groups: the budget is achievable
        sens = torch.rand(n, generator=gen) ** 6 * 10 ** float(torch.rand(1, generator=gen) * 6 - 3)
        alloc = allocate(sens, n, target, groups, rule, lo, hi)
        assert all(lo <= b <= hi for b in alloc.bits), alloc.bits
        assert all(a >= b for a, b in zip(alloc.bits, alloc.bits[1:])), alloc.bits
        assert alloc.average_bits() <= target + 1e-12
        assert total_bits(alloc) == best_total(sizes_of(alloc), target * n, lo, hi), (trial, alloc.bits)
        if target * groups == int(target * groups):
            assert alloc.average_bits() == pytest.approx(target)


@pytest.mark.parametrize("lo,hi", [(2, 3), (1, 2), (2, 2)])
def test_clamps_respected(lo: int, hi: int) -> None:
    sens = torch.tensor([1e6, 1e6, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # wants (8+, 0, 0, 0)
    alloc = allocate(sens, 8, 2.0, 4, "proportional", lo, hi)
    assert all(lo <= b <= hi for b in alloc.bits)
    assert alloc.average_bits() <= 2.0
    assert total_bits(alloc) == best_total(sizes_of(alloc), 16, lo, hi)


def test_impossible_budget_raises() -> None:
    with pytest.raises(ConfigError, match="cannot meet"):
        allocate(None, 8, 1.0, 4, "uniform", 2, 4)


def test_repair_budget_moves_bits_by_rounding_residual() -> None:
    # wanted (2.6, 2.4, 1.6, 1.4) rounds to (3, 2, 2, 1) = 8 = budget: kept as is.
    assert repair_budget([3, 2, 2, 1], [2, 2, 2, 2], 16, 1, 4, [2.6, 2.4, 1.6, 1.4]) == [3, 2, 2, 1]
    # (3, 3, 2, 1) = 9 > 8: the most over-rounded group (g1: 3 − 2.51) loses the bit.
    assert repair_budget([3, 3, 2, 1], [2, 2, 2, 2], 16, 1, 4, [2.9, 2.51, 1.6, 1.0]) == [3, 2, 2, 1]
    # (3, 2, 1, 1) = 7 < 8: the most under-rounded allowed group (g2: 1.45 − 1) gains it.
    assert repair_budget([3, 2, 1, 1], [2, 2, 2, 2], 16, 1, 4, [3.0, 2.0, 1.45, 1.4]) == [3, 2, 2, 1]


def test_budget_reached_with_unequal_groups() -> None:
    alloc = allocate(None, 10, 2.5, 4, "uniform", 1, 4)
    assert sizes_of(alloc) == [3, 3, 3, 1]
    assert total_bits(alloc) == best_total([3, 3, 3, 1], 25, 1, 4) == 25
    assert alloc.average_bits() == 2.5


def test_codebook_aware_repair_buys_index_bits_not_codebooks() -> None:
    """With a cost that counts codebooks (2**(b*d) entries), a high-bit group can spend more of the
    budget while giving fewer index bits; the repair must prefer the index bits."""
    sizes, rows, d = [16, 16, 16, 16], 100, 2

    def cost(g: int, b: int) -> float:
        return sizes[g] * rows * b + 2 ** (b * d) * d * 16  # index bits + fp16 codebook

    # (4,3,2,2) spends exactly the budget but stores 11 index bits per row of 4 columns; (3,3,3,3)
    # spends less and stores 12: the repair must take the latter.
    budget = cost(0, 4) + cost(1, 3) + cost(2, 2) + cost(3, 2)
    assert sum(cost(g, 3) for g in range(4)) < budget
    bits = repair_budget([4, 3, 2, 2], sizes, budget, 1, 8, [4.0, 3.0, 2.0, 2.0], cost)
    assert bits == [3, 3, 3, 3]
