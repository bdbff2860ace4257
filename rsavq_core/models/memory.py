"""Pre-flight memory estimate of a quantization job, from the checkpoint's headers only.

A job that cannot fit should fail in a second with the figures, not after an hour of calibration
with an out-of-memory kill. The estimate reads ``config.json`` and the safetensors headers (JSON,
no tensor data) and builds a weightless skeleton of the model to find its decoder blocks, so it
costs about a second even for a 70B checkpoint.

Streamed (the pipeline's default, ``rsavq_core.models.streamed``), terms in bytes:

The run has phases, and the estimate is the largest phase's working set:

- statistics: one block's weights, its statistics, the activations held, and with gradients the
  head's pass (resident weights and the head's logits);
- quantize: one block's weights (twice when a walker copies it: sequential statistics, block-wise
  fine-tuning), its statistics, the walker's activations, and the float64 factorization of the
  widest layer's Hessian for the error feedback (2 · 8 · N² bytes while it is formed);
- save: the resident weights in float32 and the float16 copy of the largest (written one at a time).

Terms:

- resident weights: what lies outside the decoder blocks (embeddings, final norm, head) in float32;
  read in only for the passes that need them;
- block weights: the largest block in float32;
- statistics of the largest decoder block, per linear W [M, N]: mean gradient M·N, Fisher factors
  M² + N², Hessian N², each twice (the accumulators and the finished copy; the Hessian's sums are
  divided in place, and its first-token twin, N², takes the second place);
- activations: one block boundary is 4 · n · T · hidden (n windows of T tokens); every boundary is
  kept when gradients flow back down (L + 1 of them), two otherwise, up to the activation budget
  (past it they go to the offload directory); a walker holds two more (four tracking the float model);
- the language-model head of one micro-batch (logits, their softmax and gradient): 3 · b · T · vocab;
- a fixed runtime overhead (the interpreter, torch, transformers and the tokenizer);
- headroom for what the terms leave out (autograd temporaries inside a block, allocator slack).

On a GPU the weights, statistics, head and the block's inputs and outputs are device terms; the
host keeps the activation store and the runtime. Loaded whole (end-to-end fine-tuning), the
weights term is every parameter in float32 and activations two boundaries, with the headroom
measured for that path: on SmolLM2-135M the other terms summed to 2.83 GiB (rsavq, 32 × 512) and
1.60 GiB (gptq) against measured peaks of 4.16 and 2.83 GiB: ratios 1.47 and 1.77, hence ×1.8.
The streamed headroom is measured too (``bench/results/streaming.json``, ``python
bench/bench_streaming.py``): at ×1.3 the measured peaks were 0.75 (the bundled model, GPTQ), 0.68
and 0.73 (1024-wide random LLaMAs of 4 and 16 blocks, the fast preset) and 0.83 (the
Llama-3.1-8B-shaped checkpoint, GPTQ, two blocks) of the estimate; ×1.1 puts them at 0.80-0.98:
within 25 % and never above the estimate. After the in-place factorization and statistics the
8B-shaped GPTQ row measured 7.23 GiB against 7.87 (0.92, at 81f77cb), and the whole 8B-shaped job
through the service 7.89 GiB (1.00: the estimate is no longer always above the peak).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.errors import InsufficientMemoryError, UnsupportedModelError
from rsavq_core.models.coverage import Coverage, block_coverage
from rsavq_core.models.layout import find_decoder_layout, linear_at
from rsavq_core.models.weights import read_header

GIB = 2**30
RUNTIME_OVERHEAD = 1.0 * GIB
HEADROOM = 1.8  # loaded whole (see above)
STREAM_HEADROOM = 1.1  # streamed: measured, see the module docstring


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    terms: dict[str, float]  # host memory, bytes per term
    device_terms: dict[str, float] = field(default_factory=dict)  # the GPU's, when the run uses one
    phase: str = ""  # streamed: the step whose working set is the peak (statistics, quantize, save)

    @property
    def total(self) -> float:
        """Host memory (bytes)."""
        return sum(self.terms.values())

    @property
    def device_total(self) -> float:
        """Device memory (bytes); 0 for a run on the CPU."""
        return sum(self.device_terms.values())

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.terms.items())
        during = f", during {self.phase}" if self.phase else ""
        text = f"{self.total / GIB:.2f} GiB ({parts} GiB; {self.parameters / 1e6:.0f}M parameters{during})"
        if self.device_terms:
            on_device = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.device_terms.items())
            text += f" and {self.device_total / GIB:.2f} GiB on the device ({on_device} GiB)"
        return text


def safetensors_shapes(folder: Path) -> dict[str, list[int]]:
    """{tensor name: shape} from the headers of every ``*.safetensors`` file in ``folder``."""
    shapes: dict[str, list[int]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        shapes.update({k: cast(list[int], v["shape"]) for k, v in read_header(file).items()})
    return shapes


@dataclass(frozen=True)
class BlockShapes:
    """What the estimate needs of a model's decoder blocks, read from a weightless skeleton."""

    blocks_path: str  # e.g. "model.layers"
    parameters: list[int]  # every parameter of each block (norms included)
    linears: list[list[tuple[int, int]]]  # (out, in) of each block's quantizable linears
    hidden: int
    vocab: int
    coverage: Coverage  # the share of the blocks' weights those linears hold, and what stays in float


def block_shapes(folder: Path) -> BlockShapes:
    """The decoder blocks of the checkpoint in ``folder``, found on a skeleton of the model built on
    the meta device (no weights are read or allocated, so this costs a second even for a 70B model)
    by ``find_decoder_layout``: the same definition of a block that the pipeline quantizes, not a
    guess from tensor names."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as exc:
        raise UnsupportedModelError(f"{folder}: cannot build the model from its config.json: {exc}") from exc
    layout = find_decoder_layout(skeleton)
    linears, counts = [], []
    for index, block in enumerate(layout.blocks):
        modules = [linear_at(block, name) for name in layout.linear_names(index)]
        linears.append([(m.out_features, m.in_features) for m in modules])
        counts.append(sum(p.numel() for p in block.parameters()))
    text = config.get_text_config()
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    names = [(i, name) for i in range(len(layout.blocks)) for name in layout.linear_names(i)]
    return BlockShapes(layout.blocks_path, counts, linears, hidden, vocab, block_coverage(layout, names))


def block_linear_shapes(folder: Path) -> list[list[tuple[int, int]]]:
    """(out, in) of every quantizable linear of each decoder block, block by block."""
    return block_shapes(folder).linears


HEAD_CHUNK_LOGITS = 1 << 25  # logits per chunk of a streamed run's head gradient (128 MiB in float32)


def head_chunk_positions(rows: int, vocab: int) -> int:
    """Positions per chunk of the head's loss gradient for ``rows`` sequences and ``vocab`` logits."""
    return max(1, HEAD_CHUNK_LOGITS // max(1, rows * vocab))


def boundary_budget(budget_bytes: float | None, boundary_bytes: float) -> float:
    """The host-memory budget for boundaries of ``boundary_bytes`` each: ``budget_bytes`` when set
    (``RSAVQ_ACTIVATION_MEMORY_GB``), else two boundaries."""
    return 2.0 * boundary_bytes if budget_bytes is None else budget_bytes


def estimate_job_memory(
    folder: Path,
    cfg: QuantConfig,
    *,
    micro_batch: int = 4,
    streamed: bool = True,
    device: str = "cpu",
    activation_budget: float | None = None,
) -> MemoryEstimate:
    """Peak memory (bytes, per term) of quantizing the checkpoint in ``folder`` with ``cfg``: host
    terms, and device terms when ``device`` is not the CPU (``streamed`` must then be True)."""
    shapes = safetensors_shapes(folder)
    if not shapes:
        raise UnsupportedModelError(f"{folder}: no safetensors weights to estimate the job's memory from")
    parameters = sum(math.prod(s) for s in shapes.values())
    model = block_shapes(folder)
    per_block = [_block_stats(ws, cfg) for ws in model.linears] or [0]
    grads = cfg.needs_gradients()
    calibrated = cfg.needs_calibration()
    boundary = 4.0 * cfg.calib_samples * cfg.calib_len * model.hidden if calibrated else 0.0
    common = {
        "statistics": 2.0 * 4 * max(per_block),
        "lm_head": 3.0 * 4 * micro_batch * cfg.calib_len * model.vocab if grads else 0.0,
    }
    if not streamed:
        terms = {"weights": 4.0 * parameters, **common, "activations": 2.0 * boundary, "runtime": RUNTIME_OVERHEAD}
        terms["headroom"] = (HEADROOM - 1.0) * sum(terms.values())
        return MemoryEstimate(parameters=parameters, terms=terms)
    # a streamed run forms the head's logits a few positions at a time (``streamed.head_gradient``)
    chunk = min(cfg.calib_len, head_chunk_positions(micro_batch, model.vocab))
    common["lm_head"] = 3.0 * 4 * micro_batch * chunk * model.vocab if grads else 0.0
    phases = _streamed_phases(shapes, model, cfg, common, boundary, activation_budget)
    phase = max(phases, key=lambda name: sum(phases[name].values()))
    compute = dict(phases[phase])
    stored = phases["statistics"]["activations"]
    if device == "cpu":
        terms = {**compute, "runtime": RUNTIME_OVERHEAD}
        terms["headroom"] = (STREAM_HEADROOM - 1.0) * sum(terms.values())
        return MemoryEstimate(parameters=parameters, terms=terms, phase=phase)
    compute.pop("activations", None)
    compute["activations in use"] = 2.0 * boundary  # the current block's inputs and outputs
    compute["headroom"] = (STREAM_HEADROOM - 1.0) * sum(compute.values())
    host = {"activations": stored, "runtime": RUNTIME_OVERHEAD}
    host["headroom"] = (STREAM_HEADROOM - 1.0) * sum(host.values())
    return MemoryEstimate(parameters=parameters, terms=host, device_terms=compute, phase=phase)


def _streamed_phases(
    shapes: dict[str, list[int]],
    model: BlockShapes,
    cfg: QuantConfig,
    common: dict[str, float],
    boundary: float,
    activation_budget: float | None,
) -> dict[str, dict[str, float]]:
    """The working set (bytes per term) of each phase of a streamed run; the peak is the largest."""
    grads = cfg.needs_gradients()
    walker = bool(cfg.block_finetune_steps) or (cfg.calib_inputs == "quantized" and cfg.needs_hessian())
    prefix = model.blocks_path + "."
    outside = [math.prod(s) for name, s in shapes.items() if not name.startswith(prefix)]
    resident = 4.0 * sum(outside)
    block = 4.0 * max(model.parameters or [0])
    levels = len(model.parameters) + 1 if grads else 2
    stored = min(levels * boundary, boundary_budget(activation_budget, boundary))  # the rest waits on disk
    # The error feedback's float64 inverse-Hessian factor of the widest input (``algorithms.linalg``):
    # factored in place, then solved into a second buffer: 2 x 8 x N² bytes (3.3 GB at N = 14336).
    widest = max((n for linears in model.linears for _, n in linears), default=0)
    factorization = 2.0 * 8 * widest * widest if cfg.needs_hessian() else 0.0
    walking = (2.0 * boundary * (2 if cfg.finetune_target == "model" else 1)) if walker else 0.0
    return {
        "statistics": {  # the block pass, then the head's gradient with embeddings and head read in
            "resident weights": resident if grads else 0.0,
            "block weights": block,
            "statistics": common["statistics"],
            "lm_head": common["lm_head"],
            "activations": stored,
        },
        "quantize": {
            "block weights": block * (2 if walker else 1),  # + the walker's copy
            "statistics": common["statistics"],
            "walker": walking,
            "factorization": factorization,
        },
        # float32, and each tensor's float16 copy as the file is written, one at a time
        "save": {"resident weights": resident, "conversion": 2.0 * max(outside or [0])},
    }


def check_fits(estimate: MemoryEstimate, capacity_bytes: float, *, who: str = "the largest worker") -> None:
    """Raise ``InsufficientMemoryError`` with the figures when the estimate exceeds the capacity."""
    if estimate.total > capacity_bytes:
        raise InsufficientMemoryError(
            f"this job needs about {estimate.describe()}, but {who} has {capacity_bytes / GIB:.2f} GiB; "
            "use fewer or shorter calibration sequences, or a worker with more memory"
        )


def _block_stats(weights: list[tuple[int, int]], cfg: QuantConfig) -> float:
    """Float32 elements of one block's statistics (without the first-token Hessians)."""
    total = 0.0
    for m, n in weights:
        if cfg.needs_gradients():
            total += m * n + m * m + n * n
        if cfg.needs_hessian() or cfg.needs_gradients():
            total += n * n
    return total


def statistics_store_bytes(linears: list[list[tuple[int, int]]], cfg: QuantConfig) -> float:
    """Bytes of the statistics store of these blocks' linears (the cache writes every tensor,
    shared inputs' Hessians once per linear, and the first-token Hessians beside them)."""
    if not cfg.needs_calibration():
        return 0.0
    first = sum(n * n for block in linears for _, n in block)
    return 4.0 * (sum(_block_stats(block, cfg) for block in linears) + first)
