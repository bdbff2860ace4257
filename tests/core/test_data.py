"""Calibration windows: drawn across the split (seeded, non-overlapping, in text order) or the first ones."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from rsavq_core.data.windows import bos_token, calibration_windows, evaluation_windows, sampled_windows, token_windows
from rsavq_core.errors import CalibrationError
from rsavq_core.evaluation.perplexity import protocol_name

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


class BosFirst:
    """A tokenizer that puts BOS in front of every text, as Llama's does (wrapping the bundled one)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.bos_token_id, self.name_or_path = inner, inner.bos_token_id, inner.name_or_path

    def __call__(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> dict[str, list[int]]:
        ids = self.inner(text, add_special_tokens=False, **kwargs)["input_ids"]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + list(ids)}

    def __len__(self) -> int:
        return len(self.inner)


def test_windows_follow_the_tokenizers_bos_convention(tiny_llama: Any) -> None:
    _, tokenizer = tiny_llama
    assert bos_token(tokenizer) is None  # SmolLM2's tokenizer adds no BOS: windows are text only
    with_bos = BosFirst(tokenizer)
    assert bos_token(with_bos) == tokenizer.bos_token_id
    for make in (evaluation_windows, lambda t, n, length: calibration_windows(t, n, length, sampling="first")):
        plain, bos = make(tokenizer, 3, 16), make(with_bos, 3, 16)
        assert bos.shape == plain.shape == (3, 16)
        assert (bos[:, 0] == tokenizer.bos_token_id).all()
        assert torch.equal(bos[:, 1:], make(tokenizer, 3, 15))  # BOS, then the same text, one token less
    assert protocol_name(64, 512, bos=True) == "wiki-holdout-512+bos"
