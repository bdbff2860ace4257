"""Pre-flight memory estimate of a quantization job, from the checkpoint's headers only.

A job that cannot fit should fail in a second with the figures, not after an hour of calibration
with an out-of-memory kill. The estimate reads ``config.json`` and the safetensors headers (JSON,
no tensor data) and builds a weightless skeleton of the model to find its decoder blocks, so it
costs about a second even for a 70B checkpoint. Terms (bytes):

- weights: every parameter in float32 (the pipeline loads the model in float32);
- statistics of the largest decoder block, twice (the accumulators and the finished copy):
  per linear W [M, N]: mean gradient M·N, Fisher factors M² + N², Hessian N²;
- block inputs and outputs of every calibration sequence: 2 · n · T · hidden;
- the language-model head of one micro-batch (logits, their softmax and gradient): 3 · b · T · vocab;
- a fixed runtime overhead (the interpreter, torch, transformers and the tokenizer);
- headroom for what the terms leave out (autograd temporaries, allocator slack, evaluation).
The headroom is measured, not guessed: on SmolLM2-135M the sum of the other terms was 2.83 GiB
(rsavq, 32 × 512) and 1.60 GiB (gptq) against measured peak RSS of 4.16 and 2.83 GiB for the whole
run including evaluation (README, ablation table): ratios 1.47 and 1.77, hence ×1.8.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.errors import InsufficientMemoryError, UnsupportedModelError
from rsavq_core.models.layout import find_decoder_layout, linear_at

GIB = 2**30
RUNTIME_OVERHEAD = 1.0 * GIB
HEADROOM = 1.8


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    terms: dict[str, float]  # bytes per term

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.terms.items())
        return f"{self.total / GIB:.2f} GiB ({parts} GiB; {self.parameters / 1e6:.0f}M parameters)"


def safetensors_shapes(folder: Path) -> dict[str, list[int]]:
    """{tensor name: shape} from the headers of every ``*.safetensors`` file in ``folder``."""
    shapes: dict[str, list[int]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def block_linear_shapes(folder: Path) -> list[list[tuple[int, int]]]:
    """(out, in) of every quantizable linear of each decoder block, block by block.

    From a skeleton of the model built on the meta device (no weights are read or allocated, so
    this costs a second even for a 70B model) and ``find_decoder_layout``: the same definition of a
    decoder block that the pipeline quantizes, not a guess from tensor names.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as exc:
        raise UnsupportedModelError(f"{folder}: cannot build the model from its config.json: {exc}") from exc
    layout = find_decoder_layout(skeleton)
    shapes = []
    for index, block in enumerate(layout.blocks):
        linears = [linear_at(block, name) for name in layout.linear_names(index)]
        shapes.append([(m.out_features, m.in_features) for m in linears])
    return shapes


def estimate_job_memory(folder: Path, cfg: QuantConfig, *, micro_batch: int = 4) -> MemoryEstimate:
    """Peak host memory (bytes, per term) of quantizing the checkpoint in ``folder`` with ``cfg``."""
    shapes = safetensors_shapes(folder)
    if not shapes:
        raise UnsupportedModelError(f"{folder}: no safetensors weights to estimate the job's memory from")
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    config = config.get("text_config", config)  # multimodal wrappers keep the LM's sizes here
    parameters = sum(math.prod(s) for s in shapes.values())
    per_block = [_block_stats(ws, cfg) for ws in block_linear_shapes(folder)] or [0]
    hidden = int(config.get("hidden_size") or 0)
    vocab = int(config.get("vocab_size") or 0)
    calib = cfg.needs_calibration()
    terms = {
        "weights": 4.0 * parameters,
        "statistics": 2.0 * 4 * max(per_block),
        "activations": 2.0 * 4 * cfg.calib_samples * cfg.calib_len * hidden if calib else 0.0,
        "lm_head": 3.0 * 4 * micro_batch * cfg.calib_len * vocab if cfg.needs_gradients() else 0.0,
        "runtime": RUNTIME_OVERHEAD,
    }
    terms["headroom"] = (HEADROOM - 1.0) * sum(terms.values())
    return MemoryEstimate(parameters=parameters, terms=terms)


def check_fits(estimate: MemoryEstimate, capacity_bytes: float, *, who: str = "the largest worker") -> None:
    """Raise ``InsufficientMemoryError`` with the figures when the estimate exceeds the capacity."""
    if estimate.total > capacity_bytes:
        raise InsufficientMemoryError(
            f"this job needs about {estimate.describe()}, but {who} has {capacity_bytes / GIB:.2f} GiB; "
            "use fewer or shorter calibration sequences, or a worker with more memory"
        )


def _block_stats(weights: list[tuple[int, int]], cfg: QuantConfig) -> float:
    total = 0.0
    for m, n in weights:
        if cfg.needs_gradients():
            total += m * n + m * m + n * n
        if cfg.needs_hessian() or cfg.needs_gradients():
            total += n * n
    return total
