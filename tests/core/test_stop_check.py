"""The inner loops' stop check: a cancelled run stops inside a layer, not after it."""

from __future__ import annotations

import pytest
import torch

from rsavq_core.algorithms.column_loop import quantize_columns
from rsavq_core.errors import JobCancelled
from rsavq_core.progress import check_stop, stop_check


def test_the_column_loop_stops_between_column_blocks() -> None:
    w, hinv = torch.randn(8, 64), torch.eye(64)
    seen: list[int] = []

    def quantize(col: int, values: torch.Tensor, _block: object) -> torch.Tensor:
        seen.append(col)
        return values.round()

    def cancel_after_two_blocks() -> None:
        if len(seen) >= 32:
            raise JobCancelled("cancelled")

    with stop_check(cancel_after_two_blocks), pytest.raises(JobCancelled):
        quantize_columns(w, hinv, quantize, block_size=16)
    assert seen == list(range(32))  # two blocks of 16 columns, then nothing
    quantize_columns(w, hinv, quantize, block_size=16)  # outside the block: no check, the whole loop
    assert len(seen) == 32 + 64


def test_no_check_installed_is_a_no_op() -> None:
    check_stop()
