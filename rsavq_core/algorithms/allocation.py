"""WCSG bit allocation: channel bits, sorted channel groups, per-group bits, budget repair (spec §5)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rsavq_core.errors import ConfigError

log = logging.getLogger(__name__)
GroupCost = Callable[[int, int], float]  # (group index, bits) -> stored bits of that group


@dataclass
class Allocation:
    perm: torch.Tensor  # [N] int64: permuted column j is original column perm[j]
    bounds: list[tuple[int, int]]  # [(start, stop)] of each group in permuted order
    bits: list[int]  # b_g per group, non-increasing when sorted by sensitivity

    def average_bits(self) -> float:
        total = sum((stop - start) * b for (start, stop), b in zip(self.bounds, self.bits, strict=True))
        return total / self.bounds[-1][1]


def channel_bits(sensitivity: torch.Tensor, target: float, rule: str) -> torch.Tensor:
    """Unrounded b_c for every channel, [N] float64. sensitivity: [N] float32, I_c ≥ 0 (unshifted).

    proportional [P-Alg1]: b_c = B_max · log2(I_c + 1) / Σ log2(I_c' + 1), B_max = target · N.
    additive (spec §5.2, reverse water-filling): b_c = target + ½(log2 I_c − mean log2 I).
    """
    sens = sensitivity.double()
    n = sens.numel()
    if rule == "proportional":
        logs = torch.log2(sens + 1.0)
        total = float(logs.sum())
        if total <= 0 or not math.isfinite(total):
            return torch.full((n,), float(target), dtype=torch.float64)
        return target * n * logs / total
    if rule == "additive":
        logs = torch.log2(sens.clamp_min(1e-30))
        return target + 0.5 * (logs - logs.mean())
    raise ConfigError(f"unknown allocation rule {rule!r}")


def repair_budget(
    bits: list[int],
    sizes: list[int],
    budget: float,
    lo: int,
    hi: int,
    wanted: list[float],
    cost: GroupCost | None = None,
) -> list[int]:
    """The per-group bits closest to ``wanted`` among those that spend the most of the budget.

    ``cost(g, b)`` is what group g costs at b bits, in the budget's unit; by default
    ``sizes[g] * b`` (index bits per row), and then a budget below ``lo`` bits is a ConfigError.
    With a codebook-aware cost the budget is the layer's effective bits, which a small layer may
    not be able to meet at all: then every group gets ``lo`` and a warning is logged (the
    effective bpw the caller reports says by how much the layer missed).

    Exhaustive over non-increasing tuples in [lo, hi] (groups are sorted by sensitivity, so a less
    sensitive group never gets more bits than a more sensitive one): maximise the index bits
    Σ sizes·bits subject to cost ≤ budget, then minimise Σ sizes·(bits − wanted)², then prefer
    the rounded ``bits``. The objective is index bits, not the cost spent: under a codebook-aware
    cost, spending more would favour a high-bit group whose codebook alone costs more than the
    index bits it buys (measured: 3.1 effective bpw went to (5,2,2,2) and (4,4,2,2) layers). G is
    small (4 in the paper), so this is at most a few thousand tuples; a greedy one-bit-at-a-time
    repair can stop short of the budget when group sizes differ.
    """
    eps = 1e-9
    index_budget = cost is None
    cost = cost or (lambda g, b: sizes[g] * b)
    best: tuple[int, float, int, tuple[int, ...]] | None = None
    floor_rest = [sum(cost(h, lo) for h in range(g + 1, len(sizes))) for g in range(len(sizes))]

    def visit(prefix: list[int], spent: float) -> None:
        nonlocal best
        g = len(prefix)
        if g == len(sizes):
            if spent > budget + eps:
                return
            index_bits = sum(s * b for s, b in zip(sizes, prefix, strict=True))
            dist = sum(s * (b - w) ** 2 for s, b, w in zip(sizes, prefix, wanted, strict=True))
            moved = sum(abs(b - r) for b, r in zip(prefix, bits, strict=True))
            key = (-index_bits, dist, moved, tuple(prefix))
            if best is None or key < best:
                best = key
            return
        top = prefix[-1] if prefix else hi
        for b in range(lo, top + 1):
            # Prune: the remaining groups get at least lo bits each (costs grow with bits).
            if spent + cost(g, b) + floor_rest[g] > budget + eps:
                break
            visit([*prefix, b], spent + cost(g, b))

    visit([], 0)
    if best is None and index_budget:
        raise ConfigError(f"cannot meet {budget / sum(sizes):.3f} bits per weight with at least {lo} bits")
    if best is None:
        log.warning("no per-group bits in [%d, %d] fit the budget; using %d everywhere", lo, hi, lo)
        return [lo] * len(sizes)
    return list(best[3])


def group_bounds(in_features: int, n_groups: int) -> list[tuple[int, int]]:
    """[start, stop) of each channel group: ⌈C/G⌉ channels per group, the last one smaller [P-Alg1]."""
    size = math.ceil(in_features / min(n_groups, in_features))
    return [(s, min(s + size, in_features)) for s in range(0, in_features, size)]


def allocate(
    sensitivity: torch.Tensor | None,
    in_features: int,
    target: float,
    n_groups: int,
    rule: str,
    lo: int,
    hi: int,
    device: torch.device | str = "cpu",
    budget_cost: tuple[Callable[[int, int], float], float] | None = None,
) -> Allocation:
    """Sort channels by I_c (descending), cut into ``n_groups`` equal groups, give each its bits.

    sensitivity: [N] float32 or None; ``rule="uniform"`` (or no sensitivity) keeps the original
    column order and gives every group the target bits (spread by repair when fractional).
    budget_cost: optional (cost(size, bits) of a group of ``size`` columns, budget) replacing the
    default index-bit budget target·N (see ``vq.effective_budget``).
    """
    n = in_features
    bounds = group_bounds(n, n_groups)
    sizes = [stop - start for start, stop in bounds]
    budget = target * n
    if rule == "uniform" or sensitivity is None:
        perm = torch.arange(n, device=device)
        wanted = [float(target)] * len(bounds)
        start_bits = [math.floor(target)] * len(bounds)
    else:
        if sensitivity.shape != (n,):
            raise ConfigError(f"sensitivity has shape {tuple(sensitivity.shape)}, expected ({n},)")
        # Stable sort so equal sensitivities keep their original order (reproducible permutations).
        perm = torch.sort(sensitivity.double(), descending=True, stable=True).indices.to(device)
        per_channel = channel_bits(sensitivity, target, rule)[perm]
        wanted = [float(per_channel[s:e].mean()) for s, e in bounds]
        start_bits = [int(round(w)) for w in wanted]
    cost = None
    if budget_cost is not None:
        group_cost, budget = budget_cost
        cost = lambda g, b: group_cost(sizes[g], b)  # noqa: E731
    bits = repair_budget(start_bits, sizes, budget, lo, hi, wanted, cost)
    return Allocation(perm=perm, bounds=bounds, bits=bits)
