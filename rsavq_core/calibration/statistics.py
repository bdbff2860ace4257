"""Calibration statistics per linear layer, computed block by block (spec §3).

For each ``nn.Linear`` W [M, N] of every decoder block this computes, in float32:

* ``grad_mean``  Ḡ = E_s[G_s]                 [M, N]  (G_s = ∂ℓ_s/∂W, ℓ_s = mean token CE of sequence s)
* ``fisher_out`` F_O                          [M, M]
* ``fisher_in``  F_I                          [N, N]
* ``tau``        τ, so that F ≈ (F_I ⊗ F_O) / τ (spec §3.3 normalisation)
* ``hessian``    H = E_t[x_t x_tᵀ]              [N, N]  (activation Hessian for GPTQ / compensation)

``fisher="exact"`` is the paper's per-sequence form [P A.9]: F_O = E_s[G_s G_sᵀ], F_I = E_s[G_sᵀ G_s],
τ = E_s‖G_s‖². ``fisher="kfac"`` is textbook K-FAC (spec §3.3): F_I = E_t[x xᵀ], F_O = T·E_t[δ δᵀ] with δ
the per-token output gradient of ℓ_s, τ = 1; the factor T makes (F_I ⊗ F_O) the K-FAC estimate of
the same per-sequence Fisher, so every downstream formula is shared.

How (memory ≈ one block plus its statistics, plus the block-boundary activations):
1. one forward of the whole model per micro-batch records each block's input and keyword arguments
   (rotary embeddings, masks: whatever the architecture passes) and, with every weight frozen,
   back-propagates the loss only through the head to get ∂ℓ/∂(last block output);
2. blocks are then revisited from last to first: each is re-run on its recorded inputs, the gradient
   is pushed through it, and forward/tensor hooks on its linears see every input x and output
   gradient δ, from which G_s = δ_sᵀ X_s and the factors are formed. Its input gradient becomes the
   output gradient of the block below. Weights never need ``.grad``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rsavq_core.calibration.block_io import as_windows, detach_kwargs, first_tensor, replace_first
from rsavq_core.errors import CalibrationError
from rsavq_core.models.layout import find_decoder_layout
from rsavq_core.precision import full_precision
from rsavq_core.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class LayerStats:
    """Statistics of one linear layer W [M, N]; absent entries are None."""

    grad_mean: torch.Tensor | None  # [M, N] float32
    fisher_out: torch.Tensor | None  # [M, M] float32
    fisher_in: torch.Tensor | None  # [N, N] float32
    tau: float
    hessian: torch.Tensor | None  # [N, N] float32, mean over tokens of x xᵀ
    n_samples: int
    n_tokens: int
    # [N, N] float32, mean over windows of x₀x₀ᵀ, x₀ the window's first token: the attention sink,
    # whose rare input direction a plain token mean underweights (``sink_protected_hessian``).
    hessian_first: torch.Tensor | None = None


def sink_protected_hessian(stats: LayerStats, share: float) -> torch.Tensor:
    """[N, N] float32: H + c · E_s[x₀x₀ᵀ], with c such that the windows' first tokens carry at least
    ``share`` of the trace (c = 0 where they already do).

    The first token of a window is the attention sink: nearly every query reads its value, yet in
    most layers its input direction is rare, so an error-minimiser over the token-mean H (GPTQ, the
    VQ compensation) moves error into it (``shared/docs/quality_notes.md`` §1). Where the sink's
    input is itself massive (a down_proj fed by a massive activation) it already dominates H, and
    a fixed extra count would starve every other token; a share adapts to both. In H the first
    tokens weigh tr(H₀)/T of tr(H) (H₀ = E_s[x₀x₀ᵀ], T tokens per window); solving
    (tr(H₀)/T + c tr(H₀)) / (tr(H) + c tr(H₀)) = share gives c.
    """
    if stats.hessian is None:
        raise CalibrationError("these statistics hold no activation Hessian")
    if share == 0:
        return stats.hessian
    if stats.hessian_first is None:
        raise CalibrationError("these statistics hold no first-token Hessian (recompute them)")
    if not 0 < share < 1:
        raise CalibrationError(f"the first tokens' share of the Hessian must lie in [0, 1), got {share}")
    tokens_per_window = stats.n_tokens / max(stats.n_samples, 1)
    total, first = float(stats.hessian.double().trace()), float(stats.hessian_first.double().trace())
    if first <= 0:
        return stats.hessian  # no signal at the first position (e.g. a layer fed zeros there)
    extra = (share * total - first / tokens_per_window) / ((1 - share) * first)
    return stats.hessian + max(0.0, extra) * stats.hessian_first


class _Accumulator:
    """Running sums for one linear; hooks feed it (x [B, T, N], δ [B, T, M]) pairs."""

    def __init__(self, fisher: str, want_grads: bool) -> None:
        self.fisher, self.want_grads = fisher, want_grads
        self.sums: dict[str, torch.Tensor] = {}
        self.tau = 0.0
        self.n_samples = self.n_tokens = 0

    def _add(self, key: str, value: torch.Tensor) -> None:
        if key in self.sums:
            self.sums[key] += value
        else:
            self.sums[key] = value.clone()

    def _add_gram(self, key: str, rows: torch.Tensor) -> None:
        """sums[key] += rowsᵀ rows (rows: [R, N] float32) in place: no [N, N] temporary (an 8B down
        projection's is 0.8 GB, and a temporary plus its first copy were two)."""
        if key in self.sums:
            self.sums[key].addmm_(rows.T, rows)
        else:
            self.sums[key] = rows.T @ rows

    @full_precision
    def add_inputs(self, x: torch.Tensor) -> None:
        """x: [B, T, N]: the Hessian xᵀx and the first tokens' x₀ᵀx₀ ([N, N] each)."""
        flat = x.reshape(-1, x.shape[-1]).float()
        self._add_gram("xx", flat)
        self._add_gram("x0", x[:, 0, :].float())
        self.n_tokens += flat.shape[0]
        self.n_samples += x.shape[0]

    @full_precision
    def add_gradients(self, x: torch.Tensor, delta: torch.Tensor) -> None:
        """x: [B, T, N] inputs, δ: [B, T, M] gradients of Σ_s ℓ_s w.r.t. the outputs."""
        x, delta = x.float(), delta.float()
        if self.fisher == "exact":
            per_seq = torch.bmm(delta.transpose(1, 2), x)  # G_s: [B, M, N]
            b, m, n = per_seq.shape
            self._add("g", per_seq.sum(0))
            side_by_side = per_seq.permute(1, 0, 2).reshape(m, b * n)  # [M, B·N]: Σ_s G_s G_sᵀ in one matmul
            self._add("fo", side_by_side @ side_by_side.T)
            stacked = per_seq.reshape(b * m, n)  # [B·M, N]: Σ_s G_sᵀ G_s
            self._add("fi", stacked.T @ stacked)
            self.tau += float((per_seq * per_seq).sum())
        else:
            flat_d = delta.reshape(-1, delta.shape[-1])
            flat_x = x.reshape(-1, x.shape[-1])
            self._add("g", flat_d.T @ flat_x)
            self._add("dd", flat_d.T @ flat_d)

    def finish(self, seq_len: int) -> LayerStats:
        if self.n_samples == 0:
            raise CalibrationError("a linear layer saw no calibration data")
        s, t = self.n_samples, self.n_tokens
        hessian, first = self.sums["xx"].div_(t), self.sums["x0"].div_(s)  # in place: the sums are done
        if not self.want_grads:
            return LayerStats(None, None, None, 0.0, hessian, s, t, first)
        g = self.sums["g"] / s
        if self.fisher == "exact":
            fo, fi, tau = self.sums["fo"] / s, self.sums["fi"] / s, self.tau / s
        else:
            # δ are gradients of per-sequence means: E_t[δδᵀ] = sums/t, scaled by T (see module doc).
            fo, fi, tau = self.sums["dd"] / t * seq_len, hessian, 1.0
        return LayerStats(g, fo, fi, tau, hessian, s, t, first)


def sequence_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Σ_s ℓ_s with ℓ_s the mean next-token CE of sequence s. logits [B, T, V], tokens [B, T] int64."""
    return positions_loss(logits[:, :-1], tokens[:, 1:], tokens.shape[1] - 1)


def positions_loss(logits: torch.Tensor, targets: torch.Tensor, predicted: int) -> torch.Tensor:
    """The share of ``sequence_loss`` of some positions: Σ_s Σ_p CE(logits[s, p], targets[s, p]) /
    ``predicted`` (the positions each sequence predicts in all). logits [B, P, V], targets [B, P]
    int64. Summed over every position's chunk it is ``sequence_loss``, with the same gradient per
    position, so the head's gradient may be taken a few positions at a time."""
    pred = logits.float()
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), targets.reshape(-1), reduction="none")
    return (nll.view(targets.shape[0], -1).sum(1) / predicted).sum()


def record_block_inputs(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    micro_batch: int,
    want_grads: bool,
    progress: Progress | None = None,
    keep_inputs: Container[int] | None = None,
) -> tuple[list[list[torch.Tensor]], list[list[dict[str, object]]], list[torch.Tensor] | None]:
    """Pass 1. tokens: [S, T] int64. Returns (inputs[l][b], kwargs[l][b], out_grads[b] | None).

    ``keep_inputs`` limits the recorded hidden states to those blocks (the others' lists stay
    empty); keyword arguments are recorded for every block.
    """
    blocks = find_decoder_layout(model).blocks
    batches = list(torch.split(tokens, micro_batch))
    inputs: list[list[torch.Tensor]] = [[] for _ in blocks]
    kwargs: list[list[dict[str, object]]] = [[] for _ in blocks]
    tail: list[torch.Tensor] = []

    def pre_hook(index: int) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
            hidden = args[0] if args else kw["hidden_states"]
            if keep_inputs is None or index in keep_inputs:
                inputs[index].append(hidden.detach())
            kwargs[index].append(detach_kwargs(kw))

        return hook

    def last_hook(module: nn.Module, args: tuple[Any, ...], output: object) -> object:
        leaf = first_tensor(output).detach().requires_grad_(want_grads)
        tail.append(leaf)
        return replace_first(output, leaf)

    handles = [b.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles.append(blocks[-1].register_forward_hook(last_hook))
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    out_grads: list[torch.Tensor] = []
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        for i, batch in enumerate(batches):
            with torch.set_grad_enabled(want_grads):
                logits = model(input_ids=batch, use_cache=False).logits
                if want_grads:
                    # Only the head (final norm, lm_head) is in the graph: the leaf cut it off.
                    loss = sequence_loss(logits, batch)
                    (grad,) = torch.autograd.grad(loss, tail[-1])
                    out_grads.append(grad.detach())
            tail.clear()
            del logits
            if progress:
                progress("calibration forward", i + 1, len(batches))
    finally:
        for h in handles:
            h.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
    if any(len(kw) != len(batches) for kw in kwargs):
        raise CalibrationError("not every decoder block was reached by the forward pass")
    return inputs, kwargs, (out_grads if want_grads else None)


def block_statistics(
    block: nn.Module,
    inputs: list[torch.Tensor],
    kwargs: list[dict[str, object]],
    out_grads: list[torch.Tensor] | None,
    *,
    fisher: str,
    seq_len: int,
) -> tuple[dict[str, LayerStats], list[torch.Tensor] | None]:
    """Pass 2 for one block. inputs/out_grads: per micro-batch [B, T, D] float tensors.

    Returns the statistics of each linear (by name relative to the block) and the gradients
    w.r.t. the block's inputs (the next lower block's output gradients), or None without grads.
    """
    grads = out_grads or []
    want_grads = out_grads is not None
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    acc = {n: _Accumulator(fisher, want_grads) for n in linears}
    seen_x: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}

    # q/k/v (and gate/up) share one input, yet each accumulates its own Gram matrix: computing it
    # once and adding copies needed [N, N] temporaries, which cost more memory than the matmuls cost time.
    # Some blocks (OPT's MLP) run their linears on the tokens flattened to [B·T, N]: the hooks
    # give the statistics their [B, T, N] back from the shape of the block's input.
    window_shape: list[torch.Size] = []

    def fwd_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            x = as_windows(args[0].detach(), window_shape[0], name)
            seen_x[name] = x
            acc[name].add_inputs(x)
            if want_grads and output.requires_grad:
                output.register_hook(lambda g: deltas.__setitem__(name, as_windows(g.detach(), window_shape[0], name)))

        return hook

    handles = [m.register_forward_hook(fwd_hook(n)) for n, m in linears.items()]
    in_grads: list[torch.Tensor] = []
    try:
        for b, (x, kw) in enumerate(zip(inputs, kwargs, strict=True)):
            seen_x.clear()
            deltas.clear()
            window_shape[:] = [x.shape[:2]]
            if want_grads:
                leaf = x.detach().requires_grad_(True)
                with torch.enable_grad():
                    out = first_tensor(block(leaf, **kw))
                    (g_in,) = torch.autograd.grad(out, leaf, grad_outputs=grads[b])
                in_grads.append(g_in.detach())
                for name in linears:
                    if name not in deltas:
                        raise CalibrationError(f"no gradient reached linear {name!r}; is it used in forward?")
                    acc[name].add_gradients(seen_x[name], deltas[name])
            else:
                with torch.no_grad():
                    block(x, **kw)
    finally:
        for h in handles:
            h.remove()
    return {n: a.finish(seq_len) for n, a in acc.items()}, (in_grads if want_grads else None)
