"""End-to-end fine-tuning: codes fixed, every quantized layer's continuous parameters (VQ
codebooks, scalar scales) and the model's normalisation weights trained so that the quantized
model's next-token distribution matches the float model's: KL(p_float || p_quantized) on the
calibration windows, as AQLM's global fine-tuning and PV-Tuning's continuous step do.

Adam over micro-batches in a fixed order (step s uses micro-batch s mod n), so a run is
deterministic for a given input. With ``state_file`` the trained values and the optimizer's state
are saved every ``save_every`` steps (atomically), and a killed run resumes from its last save:
the resumed run ends where an uninterrupted one would. The trained values are rounded to their
stored precision before the final divergence is measured, on windows held out from training
(when there are enough); the result is kept only if it improved there.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rsavq_core.atomic import replacing
from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.finetune.loop import adam_steps
from rsavq_core.finetune.tunable import TunedLinear, norm_parameters, round_norms, round_tuned
from rsavq_core.formats.base import QuantizedLayer
from rsavq_core.formats.registry import format_of
from rsavq_core.models.layout import replace_module
from rsavq_core.progress import Progress

log = logging.getLogger(__name__)

# Divergence before / after is measured on this many micro-batches, held out from training when
# there are at least twice as many: at lr 1e-4 the KL on trained windows fell while the held-out
# perplexity rose (README, "Quality"), so the keep-or-discard decision must not see trained windows.
MEASURE_BATCHES = 4
# What a saved state's parameter list holds; a state of another version starts over. 2: shared
# codebooks trained, and a layer's 1-D tensors no longer also listed among the norms.
STATE_VERSION = 2


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student); logits [B, T, V] float."""
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def split_held_out(batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(micro-batches to train on, micro-batches to measure on): the last MEASURE_BATCHES held out
    when at least twice as many exist, else all trained and the first MEASURE_BATCHES measured."""
    if len(batches) >= 2 * MEASURE_BATCHES:
        return batches[:-MEASURE_BATCHES], batches[-MEASURE_BATCHES:]
    return batches, batches[:MEASURE_BATCHES]


class _Student:
    """A copy of the float model with each quantized linear replaced by a trainable ``TunedLinear``."""

    def __init__(self, model: nn.Module, layers: dict[str, QuantizedLayer], norms: Mapping[str, torch.Tensor]) -> None:
        self.module = copy.deepcopy(model)
        for p in self.module.parameters():
            p.requires_grad_(False)
        with torch.no_grad():  # where block-wise fine-tuning left them
            for name, value in norms.items():
                self.module.get_parameter(name).copy_(value)
        self.linears: dict[str, TunedLinear] = {}
        # Tensors several layers share (codebooks shared across blocks): one parameter each, which
        # every layer using it reads, so the loss trains it for all of them at once (AQLM's global
        # fine-tuning trains its codebooks too; block-wise fine-tuning cannot, it sees one block).
        self.shared: dict[str, nn.Parameter] = {}
        for name, layer in layers.items():
            layer_format = format_of(layer)
            tunable = layer_format.tunable(layer)
            tied = {
                local: self.shared.setdefault(key, nn.Parameter(value))
                for local, (key, value) in layer_format.shared_tunable(layer).items()
            }
            if tunable or tied:
                self.linears[name] = TunedLinear(layer_format, layer, tunable, tied)
                replace_module(self.module, name, self.linears[name])
        self.norms = norm_parameters(self.module, set(layers))
        for p in self.norms.values():
            p.requires_grad_(True)

    def parameters(self) -> list[nn.Parameter]:
        """Every trained tensor, in a fixed order (the optimizer's state follows it)."""
        own = [p for m in self.linears.values() for p in m.parameters()]
        return own + [self.shared[key] for key in sorted(self.shared)] + list(self.norms.values())


def finetune_model(
    model: nn.Module,
    layers: dict[str, QuantizedLayer],  # by full module name
    tokens: torch.Tensor,  # [S, T] int64 calibration windows
    norms: Mapping[str, torch.Tensor] | None = None,  # full name -> the student's starting norm weights
    *,
    steps: int,
    lr: float,
    micro_batch: int,
    progress: Progress | None = None,
    state_file: Path | None = None,
    save_every: int = 8,
    stage: str = "fine-tune model",
) -> tuple[dict[str, QuantizedLayer], dict[str, torch.Tensor], dict[str, Any]]:
    """Tuned layers, tuned normalisation weights (name -> tensor) and a report (KL before / after).

    ``model`` (the float model, not changed) is the teacher; the student starts from it with
    ``layers`` and ``norms`` in place. When the divergence did not improve, the input layers and no
    norms come back.
    """
    model.eval()
    student = _Student(model, layers, norms or {})
    batches = [tokens[i : i + micro_batch] for i in range(0, tokens.shape[0], micro_batch)]
    batches, held_out = split_held_out(batches)
    params = student.parameters()
    optimizer = torch.optim.Adam(params, lr=lr)
    fingerprint = _fingerprint(tokens, layers, steps, lr, micro_batch)
    start, before = _resume(state_file, fingerprint, params, optimizer)

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher = model(batch).logits
        return kl_to_teacher(student.module(batch).logits, teacher)

    def divergence() -> float:
        with torch.no_grad():
            return sum(float(loss_of(b)) for b in held_out) / len(held_out)

    if before is None:
        before = divergence()
    measured_before = before

    def save(done: int) -> None:
        if state_file is not None and (done % save_every == 0 or done == steps):
            _save(state_file, fingerprint, done, measured_before, params, optimizer)

    adam_steps(
        optimizer,
        lambda step: loss_of(batches[step % len(batches)]),
        steps=steps,
        start=start,
        after_step=save,
        progress=progress,
        stage=stage,
        metric="kl",
    )
    tuned = round_tuned(student.linears)  # the shared tensors too, through the layers that read them
    round_norms(student.norms)  # and the norms as the checkpoint stores them
    after = divergence()
    report = {"kl_before": before, "kl_after": after, "steps": steps, "kept": after < before}
    if after >= before:
        return layers, {}, report
    norms = {name: p.detach().clone() for name, p in student.norms.items()}
    return {**layers, **tuned}, norms, report


def _fingerprint(
    tokens: torch.Tensor, layers: dict[str, QuantizedLayer], steps: int, lr: float, micro_batch: int
) -> str:
    """What a saved state belongs to: the windows, the layers' codes-and-values, the schedule."""
    digest = hashlib.sha256(f"{STATE_VERSION}:{steps}:{lr!r}:{micro_batch}".encode())
    digest.update(tokens.numpy().tobytes())
    for name in sorted(layers):
        digest.update(name.encode())
        layer_format = format_of(layers[name])
        for value in layer_format.tunable(layers[name]).values():
            digest.update(value.numpy().tobytes())
        for key, value in layer_format.shared_tunable(layers[name]).values():
            digest.update(key.encode())
            digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def _resume(
    state_file: Path | None, fingerprint: str, params: list[nn.Parameter], optimizer: torch.optim.Optimizer
) -> tuple[int, float | None]:
    """(step to start from, divergence before training): (0, None) unless a saved state of this
    very run exists, whose values and optimizer state are then loaded."""
    if state_file is None or not state_file.is_file():
        return 0, None
    state = torch.load(state_file, weights_only=True)
    if state.get("fingerprint") != fingerprint:
        return 0, None  # another run's state: start over
    with torch.no_grad():
        for parameter, value in zip(params, state["params"], strict=True):
            parameter.copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), float(state["before"])


def _save(
    state_file: Path,
    fingerprint: str,
    step: int,
    before: float,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
) -> None:
    state = {
        "fingerprint": fingerprint,
        "step": step,
        "before": before,
        "params": [p.detach().clone() for p in params],
        "optimizer": optimizer.state_dict(),
    }
    with replacing(state_file) as tmp:
        torch.save(state, tmp)


def finetune_quantized_model(
    model: nn.Module,
    layers: dict[str, QuantizedLayer],
    norms: dict[str, torch.Tensor],  # full name -> norm weight as block-wise fine-tuning left it
    tokens: torch.Tensor,  # [S, T] int64 calibration windows
    cfg: QuantConfig,
    progress: Progress | None,
    checkpoint_dir: Path | None,
) -> tuple[dict[str, QuantizedLayer], dict[str, torch.Tensor], dict[str, Any]]:
    """End-to-end fine-tuning: tuned layers, tuned normalisation weights (full names) and its report."""
    tuned, tuned_norms, report = finetune_model(
        model,
        layers,
        tokens,
        norms,
        steps=cfg.model_finetune_steps,
        lr=cfg.model_finetune_lr,
        micro_batch=cfg.finetune_batch,
        progress=progress,
        state_file=checkpoint_dir / "model-finetune.pt" if checkpoint_dir else None,
    )
    log.info(
        "end-to-end fine-tuning: KL %.4g -> %.4g (%s)",
        report["kl_before"],
        report["kl_after"],
        "kept" if report["kept"] else "discarded",
    )
    return tuned, tuned_norms, report
