"""Calibration windows: drawn across the split (seeded, non-overlapping, in text order) or the first ones."""

from __future__ import annotations

import pytest
import torch

from rsavq_core.data import sampled_windows, token_windows
from rsavq_core.errors import CalibrationError

IDS = list(range(1000))  # token i is i: a window's first id tells where it starts


def test_sampled_windows_are_whole_non_overlapping_windows_spread_over_the_text() -> None:
    windows = sampled_windows(IDS, 8, 10, seed=3)
    assert windows.shape == (8, 10) and windows.dtype == torch.int64
    starts = windows[:, 0].tolist()
    assert all(s % 10 == 0 for s in starts)  # aligned: the split's own windows, never straddling two
    assert starts == sorted(set(starts))  # distinct, in text order
    assert torch.equal(windows, torch.tensor(starts)[:, None] + torch.arange(10))
    assert max(starts) > 500  # not the first 8 windows (0..70): across the whole text


def test_the_seed_decides_and_the_same_seed_repeats() -> None:
    assert torch.equal(sampled_windows(IDS, 8, 10, seed=3), sampled_windows(IDS, 8, 10, seed=3))
    assert not torch.equal(sampled_windows(IDS, 8, 10, seed=3), sampled_windows(IDS, 8, 10, seed=4))


def test_first_windows_and_too_few_windows() -> None:
    assert token_windows(IDS, 3, 10)[:, 0].tolist() == [0, 10, 20]
    assert sampled_windows(IDS, 100, 10, seed=0).shape == (100, 10)  # all of them
    with pytest.raises(CalibrationError, match="holds 100 windows"):
        sampled_windows(IDS, 101, 10, seed=0)
