"""wiki-holdout-512 perplexity: mechanics on a tiny random LLaMA, plausibility on the bundled model."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rsavq_core.data.windows import evaluation_windows
from rsavq_core.errors import ConfigError
from rsavq_core.evaluation import perplexity
from rsavq_core.evaluation.perplexity import protocol_name
from rsavq_core.models.layout import quantizable_linears


def naive_ppl(model: nn.Module, windows: torch.Tensor) -> float:
    """exp(mean NLL), one window at a time, in float64: an independent reference."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logp = model(window[None]).logits[0].double().log_softmax(-1)  # [L, V]
            total -= logp[torch.arange(len(window) - 1), window[1:]].sum().item()
            count += len(window) - 1
    return math.exp(total / count)


def test_matches_naive_loop(tiny_llama) -> None:
    model, tok = tiny_llama
    result = perplexity(model, tok, n_windows=4, length=64, batch_size=3)
    expected = naive_ppl(model, evaluation_windows(tok, 4, 64))
    assert result["ppl"] == pytest.approx(expected, rel=1e-5)
    assert result["nll"] == pytest.approx(math.log(expected), rel=1e-5)
    shape = (result["windows"], result["tokens"], result["seq_len"], result["dtype"])
    assert shape == (4, 4 * 63, 64, "float32")


def test_batch_size_does_not_change_result(tiny_llama) -> None:
    model, tok = tiny_llama
    one = perplexity(model, tok, n_windows=3, length=64, batch_size=1)
    four = perplexity(model, tok, n_windows=3, length=64, batch_size=4)
    assert one["ppl"] == pytest.approx(four["ppl"], rel=1e-5)


def test_protocol_name_labels_variants(tiny_llama) -> None:
    model, tok = tiny_llama
    assert protocol_name(64, 512) == "wiki-holdout-512"
    assert protocol_name(8, 512) == "wiki-holdout-512[windows=8]"
    assert protocol_name(64, 256) == "wiki-holdout-512[length=256]"
    result = perplexity(model, tok, n_windows=2, length=32)
    assert result["protocol"] == "wiki-holdout-512[windows=2,length=32]"


def test_progress_reports_every_batch(tiny_llama) -> None:
    model, tok = tiny_llama
    calls: list[tuple[int, int]] = []
    perplexity(
        model, tok, n_windows=5, length=32, batch_size=2, progress=lambda stage, d, t, detail=None: calls.append((d, t))
    )
    assert calls == [(2, 5), (4, 5), (5, 5)]


class _BufferLinear(nn.Module):
    """A stand-in for a quantized layer: not an nn.Linear, weight held as a buffer."""

    weight: torch.Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().clone())  # [out, in] float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def test_works_with_replaced_linears_and_low_precision(tiny_llama) -> None:
    model, tok = tiny_llama
    swapped = copy.deepcopy(model)
    for name, linear in quantizable_linears(swapped):
        parent, _, attr = name.rpartition(".")
        setattr(swapped.get_submodule(parent), attr, _BufferLinear(linear))
    reference = perplexity(model, tok, n_windows=2, length=64)
    swapped_ppl = perplexity(swapped, tok, n_windows=2, length=64)["ppl"]
    assert swapped_ppl == pytest.approx(reference["ppl"], rel=1e-5)
    half = perplexity(copy.deepcopy(model).to(torch.bfloat16), tok, n_windows=2, length=64)
    assert half["dtype"] == "bfloat16"
    assert half["ppl"] == pytest.approx(reference["ppl"], rel=0.05)


@pytest.mark.parametrize("kwargs", [{"n_windows": 0}, {"length": 1}, {"batch_size": 0}])
def test_invalid_arguments(tiny_llama, kwargs: dict[str, Any]) -> None:
    model, tok = tiny_llama
    with pytest.raises(ConfigError):
        perplexity(model, tok, **kwargs)


@pytest.mark.slow
def test_bundled_model_plausible(smol) -> None:
    model, tok = smol
    result = perplexity(model, tok, n_windows=8)
    assert result["protocol"] == "wiki-holdout-512[windows=8]"
    assert 10 < result["ppl"] < 40
