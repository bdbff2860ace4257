"""What each block receives in the partly quantized model: for sequential calibration (each block's
activation Hessians from the outputs of the blocks before it, quantized, as the reference GPTQ
does) and for block-wise fine-tuning (which trains a block on those inputs).

With the float model's statistics every block is calibrated on inputs it will never see once the
blocks below it are quantized; sequentially, block i's Hessian includes their error, so its
error feedback can correct for it. Only the Hessians are sequential: gradient statistics stay the
float model's (gradients through the quantized model would need a backward pass per block).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from rsavq_core.calibration.block_io import first_tensor
from rsavq_core.calibration.statistics import LayerStats, block_statistics, record_block_inputs
from rsavq_core.formats.base import QuantizedLayer
from rsavq_core.progress import Progress


class BlockInputs:
    """Walks the blocks in order: the current block's ``inputs``, its ``hessians``, then ``advance``.

    With ``track_float`` it also walks the float model alongside (``float_outputs``)."""

    def __init__(
        self,
        model: nn.Module,
        tokens: torch.Tensor,
        *,
        micro_batch: int,
        track_float: bool = False,
        progress: Progress | None = None,
    ):
        """tokens: [S, T] int64 calibration windows."""
        inputs, kwargs, _ = record_block_inputs(
            model, tokens, micro_batch=micro_batch, want_grads=False, progress=progress, keep_inputs=(0,)
        )
        self._start(inputs[0], kwargs, tokens.shape[1], track_float)

    @classmethod
    def from_recorded(
        cls,
        first: list[torch.Tensor],
        kwargs: list[list[dict[str, object]]],
        seq_len: int,
        *,
        track_float: bool = False,
    ) -> BlockInputs:
        """A walker from block 0's inputs (per micro-batch [B, T, D] float) and every block's keyword
        arguments, as a streamed model records them (``calibration.streamed.record_boundary``)."""
        walker = cls.__new__(cls)
        walker._start(first, kwargs, seq_len, track_float)
        return walker

    def _start(
        self, first: list[torch.Tensor], kwargs: list[list[dict[str, object]]], seq_len: int, track_float: bool
    ) -> None:
        self.kwargs = kwargs
        self.inputs = first  # per micro-batch [B, T, D]: what the current block receives
        # per micro-batch [B, T, D]: what the current block receives in the float model (tracked or None)
        self.float_inputs = list(self.inputs) if track_float else None
        self._float_outputs: list[torch.Tensor] | None = None
        self.seq_len = seq_len
        self.index = 0

    @property
    def block_kwargs(self) -> list[dict[str, object]]:
        """The current block's keyword arguments per micro-batch (rotary embeddings, masks...)."""
        return self.kwargs[self.index]

    def hessians(self, block: nn.Module) -> dict[str, LayerStats]:
        """Hessian statistics of the current block's linears (by name relative to the block)."""
        stats, _ = block_statistics(
            block, self.inputs, self.kwargs[self.index], None, fisher="exact", seq_len=self.seq_len
        )
        return stats

    def float_outputs(self, block: nn.Module) -> list[torch.Tensor]:
        """Per micro-batch [B, T, D]: the float model's outputs of the current block (``block`` must
        still be the float block the first time this is asked; the answer is kept until ``advance``)."""
        if self.float_inputs is None:
            raise RuntimeError("BlockInputs was built without track_float")
        if self._float_outputs is None:
            with torch.no_grad():
                self._float_outputs = [
                    first_tensor(block(x, **kw)).detach()
                    for x, kw in zip(self.float_inputs, self.kwargs[self.index], strict=True)
                ]
        return self._float_outputs

    def advance(
        self,
        block: nn.Module,
        layers: dict[str, QuantizedLayer],
        norms: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Move to the next block: the current one's outputs with ``layers`` and tuned ``norms`` (by
        relative name) in place."""
        if self.float_inputs is not None:
            self.float_inputs, self._float_outputs = self.float_outputs(block), None
        quantized = copy.deepcopy(block)
        with torch.no_grad():
            for name, layer in layers.items():
                linear = quantized.get_submodule(name)
                if isinstance(linear, nn.Linear):
                    linear.weight.copy_(layer.dequantize(linear.weight.dtype))
            for name, value in (norms or {}).items():
                quantized.get_parameter(name).copy_(value)
            self.inputs = [
                first_tensor(quantized(x, **kw)).detach()
                for x, kw in zip(self.inputs, self.kwargs[self.index], strict=True)
            ]
        self.index += 1

    def advance_unchanged(self, block: nn.Module) -> None:
        """Move to the next block through ``block`` as it is (float weights): the float model's
        inputs, for Hessians computed block by block instead of stored (``Calibration.float_walk``)."""
        with torch.no_grad():
            self.inputs = [
                first_tensor(block(x, **kw)).detach()
                for x, kw in zip(self.inputs, self.kwargs[self.index], strict=True)
            ]
        self.index += 1


def with_hessians(stats: LayerStats | None, sequential: LayerStats) -> LayerStats:
    """``stats`` (gradients from the float model, or None) with the sequential Hessians in place."""
    if stats is None:
        return sequential
    return dataclasses.replace(stats, hessian=sequential.hessian, hessian_first=sequential.hessian_first)
