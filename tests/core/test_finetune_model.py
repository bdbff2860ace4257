"""End-to-end fine-tuning (rsavq_core/finetune/end_to_end.py) on a tiny model: it lowers the KL to the
float model, is deterministic, and a killed run resumes to the same values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.finetune.end_to_end import finetune_model, kl_to_teacher
from rsavq_core.models.layout import quantizable_linears
from rsavq_core.pipeline.blocks import quantize_layer


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def quantized(tiny_llama: Any, one_thread: None) -> tuple[Any, dict[str, Any], torch.Tensor]:
    model, _ = tiny_llama
    cfg = QuantConfig.for_method("rtn", bits=2, group_size=16)
    layers = {name: quantize_layer(m.weight.detach(), m.bias, None, cfg)[0] for name, m in quantizable_linears(model)}
    tokens = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    return model, layers, tokens


def _run(quantized: Any, state_file: Path | None = None, progress: Any = None) -> Any:
    model, layers, tokens = quantized
    return finetune_model(
        model, layers, tokens, steps=8, lr=1e-3, micro_batch=2, progress=progress, state_file=state_file, save_every=4
    )


def test_finetuning_lowers_the_divergence_and_trains_codebooks_and_norms(quantized: Any) -> None:
    model, layers, _ = quantized
    norms_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 1}
    tuned, norms, report = _run(quantized)
    assert report["kept"] and report["kl_after"] < report["kl_before"], report
    name = next(iter(layers))
    assert not torch.equal(tuned[name].dequantize(), layers[name].dequantize())
    assert torch.equal(tuned[name].codes, layers[name].codes)  # codes fixed
    assert norms and all(not torch.equal(norms[n], norms_before[n]) for n in norms if "norm" in n)
    teacher = {n: p for n, p in model.named_parameters() if p.dim() == 1}
    assert all(torch.equal(p, norms_before[n]) for n, p in teacher.items())  # the teacher is untouched


def test_a_killed_run_resumes_to_what_an_uninterrupted_one_gives(quantized: Any, tmp_path: Path) -> None:
    whole, whole_norms, _ = _run(quantized, tmp_path / "a.pt")

    def kill_at_six(stage: str, done: int, total: int, detail: Any = None) -> None:
        if done == 6:
            raise Killed

    with pytest.raises(Killed):
        _run(quantized, tmp_path / "b.pt", kill_at_six)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 4  # saved every 4 steps
    steps_seen: list[tuple[int, float]] = []
    resumed, resumed_norms, report = _run(
        quantized, tmp_path / "b.pt", lambda s, d, t, detail: steps_seen.append((d, detail["kl"]))
    )
    assert [step for step, _ in steps_seen] == [5, 6, 7, 8]  # only what the killed run had not saved
    assert all(kl > 0 for _, kl in steps_seen)  # each step reports its divergence
    assert all(torch.equal(whole[n].dequantize(), resumed[n].dequantize()) for n in whole)
    assert all(torch.equal(whole_norms[n], resumed_norms[n]) for n in whole_norms)


def test_kl_to_teacher_is_zero_for_the_teacher_and_positive_otherwise() -> None:
    logits = torch.randn(2, 3, 11)
    assert float(kl_to_teacher(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_to_teacher(logits.flip(-1), logits)) > 0.1


def test_the_keep_decision_is_measured_on_windows_never_trained_on() -> None:
    from rsavq_core.finetune.end_to_end import MEASURE_BATCHES, split_held_out

    many = [torch.full((1, 4), i) for i in range(2 * MEASURE_BATCHES + 1)]
    train, held_out = split_held_out(many)
    assert len(held_out) == MEASURE_BATCHES and len(train) + len(held_out) == len(many)
    assert not {int(b[0, 0]) for b in train} & {int(b[0, 0]) for b in held_out}
    few = many[: MEASURE_BATCHES + 1]  # too few to spare any: train on all, measure on the first ones
    train, held_out = split_held_out(few)
    assert len(train) == len(few) and len(held_out) == MEASURE_BATCHES
