"""How much of a model's decoder blocks a run quantizes, and what stays in float.

A model whose weights are not all ``nn.Linear`` (mixture-of-experts experts stored as fused 3-D
parameters, for one) would otherwise come back mostly in float from a job that says it succeeded.
The run counts every matrix-shaped parameter of the blocks it quantizes (norms and biases are
vectors and do not count), refuses a model whose quantized linears hold less than
``COVERAGE_FLOOR`` of them unless asked to go on, and reports what stayed in float either way.
Works on a skeleton with no weights (shapes only), so the check comes before any heavy work.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from rsavq_core.errors import UnsupportedModelError
from rsavq_core.models.layout import DecoderLayout

log = logging.getLogger(__name__)

COVERAGE_FLOOR = 0.9  # below it a run stops unless ``allow_partial``


@dataclass(frozen=True)
class Coverage:
    """Weights (elements) of the decoder blocks a run quantizes, and those it leaves in float."""

    quantized: int
    total: int  # every parameter of two or more dimensions in the blocks
    # parameter name inside a block -> (shape, blocks holding it), e.g. "mlp.experts.down_proj"
    kept_float: dict[str, tuple[tuple[int, ...], int]] = field(default_factory=dict)

    @property
    def share(self) -> float:
        return self.quantized / self.total if self.total else 0.0

    def report(self) -> dict[str, Any]:
        """The figures a run's summary and a job's metrics carry."""
        return {
            "quantized_weights": self.quantized,
            "block_weights": self.total,
            "share": round(self.share, 6),
            "kept_float": {name: {"shape": list(shape), "blocks": n} for name, (shape, n) in self.kept_float.items()},
        }

    def describe_kept(self, limit: int = 6) -> str:
        """The largest weights left in float, for an error or a log line."""
        largest = sorted(self.kept_float.items(), key=lambda kv: -math.prod(kv[1][0]) * kv[1][1])
        parts = [f"{name} {list(shape)} in {n} block(s)" for name, (shape, n) in largest[:limit]]
        more = len(largest) - limit
        return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def block_coverage(layout: DecoderLayout, quantized: Collection[tuple[int, str]]) -> Coverage:
    """The coverage of ``quantized`` ((block index, linear name in the block) pairs) over the blocks
    they are in (a benchmark's block limit counts only the blocks it quantizes)."""
    linears = set(quantized)
    blocks = sorted({i for i, _ in linears}) or list(range(len(layout.blocks)))
    done = total = 0
    kept: dict[str, tuple[tuple[int, ...], int]] = {}
    for i in blocks:
        for name, param in layout.blocks[i].named_parameters():
            if param.dim() < 2:
                continue
            total += param.numel()
            owner, _, attr = name.rpartition(".")
            if attr == "weight" and (i, owner) in linears:
                done += param.numel()
            else:
                shape, seen = kept.get(name, (tuple(param.shape), 0))
                kept[name] = (shape, seen + 1)
    return Coverage(done, total, kept)


def require_coverage(coverage: Coverage, model_type: str, *, allow_partial: bool) -> None:
    """Refuse (``UnsupportedModelError``, naming what would stay in float) a model whose quantized
    linears hold less than ``COVERAGE_FLOOR`` of its block weights, unless ``allow_partial``."""
    if coverage.share >= COVERAGE_FLOOR:
        return
    what = (
        f"{model_type}: the quantizable linears hold {coverage.share:.1%} of the decoder blocks' weights "
        f"({coverage.quantized:,} of {coverage.total:,}); these would stay in float: {coverage.describe_kept()}"
    )
    if not allow_partial:
        raise UnsupportedModelError(
            f"{what}. Less than {COVERAGE_FLOOR:.0%} is refused: pass --allow-partial (allow_partial) to "
            "quantize the rest anyway"
        )
    log.warning("%s (allowed: allow_partial)", what)
