"""Calibration of a streamed model: block after block, one block's weights in memory at a time.

The whole-model pass (``statistics.record_block_inputs``) runs the model once per micro-batch.
Here the order is turned around, as the sequential onloaders of llm-compressor and GPTQModel do:

1. one forward of the skeleton per micro-batch with every block replaced by a recorder, which
   keeps block 0's input and every block's keyword arguments (rotary embeddings, masks: whatever
   the architecture passes, per block, so sliding-window layers get their own masks) and returns
   at once; no block weight is needed;
2. each block is read in, run on every micro-batch's input, and its outputs become the next
   boundary's inputs (``ActivationStore``: host memory up to a budget, disk past it);
3. with gradients, the head's loss gradient at the last boundary (the skeleton again, the blocks
   passing through, the last one substituting the stored hidden state), then the blocks from last
   to first as in ``statistics.block_statistics``.

Every block runs the very computation of the whole-model pass (same inputs, same keyword
arguments, same micro-batches), so the statistics, and the packed checkpoint quantized from them,
are the same to the last bit (``tests/core/test_streaming.py``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from rsavq_core.calibration.activations import ActivationStore
from rsavq_core.calibration.block_io import detach_kwargs, first_tensor
from rsavq_core.calibration.cache import StatsKey, StatsStore
from rsavq_core.calibration.statistics import block_statistics, positions_loss
from rsavq_core.errors import CalibrationError
from rsavq_core.models.memory import head_chunk_positions
from rsavq_core.models.streamed import StreamedModel
from rsavq_core.precision import forward_precision
from rsavq_core.progress import Progress

log = logging.getLogger(__name__)
Kwargs = dict[str, object]


class _StopForward(Exception):
    """Raised by the last recorder: nothing after the blocks is needed."""


class _Recorder(nn.Module):
    def __init__(self, index: int, sink: Callable[[int, torch.Tensor, dict[str, Any]], None], last: bool) -> None:
        super().__init__()
        self.index, self.sink, self.last = index, sink, last

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor):
            raise CalibrationError(f"decoder block {self.index} was not given its hidden states as a tensor")
        self.sink(self.index, hidden, kwargs)
        if self.last:
            raise _StopForward
        return hidden  # the following recorders need only their keyword arguments


class _Substitute(nn.Module):
    """Stands in for a block: returns ``value`` (shaped like the real block's output) whatever it is given."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.value


@contextlib.contextmanager
def blocks_replaced(blocks: nn.ModuleList, make: Callable[[int], nn.Module]) -> Iterator[None]:
    """Within the block, ``blocks[i]`` is ``make(i)``; the real blocks are put back on the way out."""
    originals = list(blocks)
    try:
        for index in range(len(originals)):
            blocks[index] = make(index)
        yield
    finally:
        for index, block in enumerate(originals):
            blocks[index] = block


def record_boundary(
    streamed: StreamedModel, tokens: torch.Tensor, micro_batch: int, attention_mask: torch.Tensor | None = None
) -> tuple[list[torch.Tensor], list[list[Kwargs]]]:
    """tokens: [S, T] int64 (``attention_mask`` [S, T] for padded rows). (block 0's input per
    micro-batch [B, T, D] float32, kwargs[block][micro-batch])."""
    blocks = streamed.layout.blocks
    first: list[torch.Tensor] = []
    kwargs: list[list[Kwargs]] = [[] for _ in blocks]

    def sink(index: int, hidden: torch.Tensor, kw: dict[str, Any]) -> None:
        if index == 0:
            first.append(hidden.detach())
        kwargs[index].append(detach_kwargs(kw))

    last = len(blocks) - 1
    # the recorder stops the forward at the last block: the head is never reached
    with (
        streamed.resident(head=False),
        blocks_replaced(blocks, lambda i: _Recorder(i, sink, i == last)),
        torch.no_grad(),
    ):
        masks = torch.split(attention_mask, micro_batch) if attention_mask is not None else None
        for index, batch in enumerate(torch.split(tokens, micro_batch)):
            extra = {"attention_mask": masks[index].to(streamed.device)} if masks is not None else {}
            with contextlib.suppress(_StopForward):
                streamed.model(input_ids=batch.to(streamed.device), use_cache=False, **extra)
    if any(len(kw) != len(first) for kw in kwargs):
        raise CalibrationError("not every decoder block was reached by the forward pass")
    return first, kwargs


def head_logits(
    streamed: StreamedModel, hidden: torch.Tensor, batch: torch.Tensor, output_like: object, **extra: Any
) -> torch.Tensor:
    """[B, T, vocab]: the model's own head (final norm, lm_head, soft-capping: whatever it does) on
    the last block's output ``hidden`` [B, T, D] for the tokens ``batch`` [B, T] int64, in the
    caller's grad mode. ``output_like``: a real block output (a tensor, or a tuple starting with one)."""
    value = (hidden, *output_like[1:]) if isinstance(output_like, tuple) else hidden
    blocks = streamed.layout.blocks
    last = len(blocks) - 1
    with blocks_replaced(blocks, lambda i: _Substitute(value) if i == last else _PassThrough()):
        logits: torch.Tensor = streamed.model(input_ids=batch.to(streamed.device), use_cache=False, **extra).logits
    return logits


def head_gradient(
    streamed: StreamedModel, hidden: torch.Tensor, batch: torch.Tensor, output_like: object
) -> torch.Tensor:
    """∂(Σ_s ℓ_s)/∂hidden [B, T, D] (ℓ_s as in ``statistics.sequence_loss``) for the last block's
    output ``hidden`` [B, T, D] float32 and the tokens ``batch`` [B, T] int64, through the model's
    own head, a few positions at a time: the head acts on each position alone, so the [B, T, vocab]
    logits (3 GiB for 4 x 512 tokens of a 128k vocabulary, and their softmax and gradient beside
    them) are never formed whole. The same gradient, position by position, as the whole pass's."""
    rows, length = batch.shape
    step = head_chunk_positions(rows, streamed.vocab_size)
    targets = batch.to(streamed.device)
    grad = torch.zeros_like(hidden)
    for start in range(0, length - 1, step):  # the last position predicts nothing: its gradient is 0
        stop = min(start + step, length - 1)
        leaf = hidden[:, start:stop].detach().requires_grad_(True)
        with torch.enable_grad():
            logits = head_logits(streamed, leaf, batch[:, start:stop], output_like)
            loss = positions_loss(logits, targets[:, start + 1 : stop + 1], length - 1)
            (piece,) = torch.autograd.grad(loss, leaf)
        grad[:, start:stop] = piece
        del logits, loss
    return grad


class _PassThrough(nn.Module):
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return args[0] if args else kwargs.get("hidden_states")


def streamed_statistics(
    streamed: StreamedModel,
    tokens: torch.Tensor,
    key: StatsKey,
    store: StatsStore,
    activations: ActivationStore,
    *,
    micro_batch: int,
    progress: Progress | None = None,
    limit: int | None = None,
) -> StatsStore:
    """Fill ``store`` with every block's statistics for ``key``. tokens: [S, T] int64.

    ``limit``: only the first ``limit`` blocks' statistics (a benchmark on a model too big to
    finish); gradients still come down from the head through every block, and the store is left
    incomplete, so that no later run takes it for a whole model's."""
    started = time.perf_counter()
    blocks = streamed.layout.blocks
    limit = len(blocks) if limit is None else min(limit, len(blocks))
    batches = list(torch.split(tokens, micro_batch))
    with forward_precision(key.compute_dtype, streamed.device.type):
        first, kwargs = record_boundary(streamed, tokens, micro_batch)
        activations.put(0, first)
        del first
        want_grads = key.with_grads
        needed = len(blocks) if want_grads else limit
        output_like: object = None
        for index in range(needed):
            with streamed.block(index) as block:
                inputs = activations.get(index)
                if not want_grads:
                    stats, _ = block_statistics(
                        block, inputs, kwargs[index], None, fisher=key.fisher, seq_len=tokens.shape[1]
                    )
                    store.save_block(index, stats)
                if want_grads or index + 1 < needed:
                    with torch.no_grad():
                        outputs = [block(x, **kw) for x, kw in zip(inputs, kwargs[index], strict=True)]
                    output_like = outputs[0]
                    activations.put(index + 1, [first_tensor(o).detach() for o in outputs])
                    del outputs
            del inputs
            if not want_grads:
                activations.drop(index)
            if progress:
                progress("calibration forward" if want_grads else "calibration statistics", index + 1, needed)
        if want_grads:
            _backward_statistics(streamed, batches, kwargs, key, store, activations, output_like, progress, limit)
    if limit == len(blocks):
        store.finish({"seconds": time.perf_counter() - started, "blocks": len(blocks), "streamed": True})
    return store


def input_gradients(
    block: nn.Module, inputs: list[torch.Tensor], kwargs: list[Kwargs], out_grads: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Per micro-batch [B, T, D]: the gradient at the block's input from the one at its output,
    without statistics (blocks past a benchmark's ``limit``)."""
    grads = []
    for x, kw, grad in zip(inputs, kwargs, out_grads, strict=True):
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad():
            (g_in,) = torch.autograd.grad(first_tensor(block(leaf, **kw)), leaf, grad_outputs=grad)
        grads.append(g_in.detach())
    return grads


def _backward_statistics(
    streamed: StreamedModel,
    batches: list[torch.Tensor],
    kwargs: list[list[Kwargs]],
    key: StatsKey,
    store: StatsStore,
    activations: ActivationStore,
    output_like: object,
    progress: Progress | None,
    limit: int,
) -> None:
    """Pass 3: the head's gradient, then each block's gradient statistics from last to first."""
    blocks = streamed.layout.blocks
    last = activations.get(len(blocks))
    with streamed.resident():
        grads: list[torch.Tensor] | None = [
            head_gradient(streamed, h, batch, output_like) for h, batch in zip(last, batches, strict=True)
        ]
    activations.drop(len(blocks))
    del last
    seq_len = batches[0].shape[1]
    for done, index in enumerate(reversed(range(len(blocks)))):
        assert grads is not None
        with streamed.block(index) as block:
            if index >= limit:
                grads = input_gradients(block, activations.get(index), kwargs[index], grads)
            else:
                stats, grads = block_statistics(
                    block, activations.get(index), kwargs[index], grads, fisher=key.fisher, seq_len=seq_len
                )
                store.save_block(index, stats)
        activations.drop(index)
        if progress:
            progress("calibration statistics", done + 1, len(blocks))
