"""GPTQ's column loop with lazy block updates, shared by every method that feeds quantization error forward.

Columns are quantized left to right; the error of column j, scaled by the inverse-Hessian factor
U (H⁻¹ = UᵀU), is pushed onto the columns not yet quantized: inside a block of ``block_size``
columns at once, onto the later columns when the block ends (Frantar et al.'s "lazy batch"
updates). What "quantize a column" means is the caller's: scalar codes on a per-group grid (GPTQ),
or the nearest codewords of fixed codebooks (VPTQ-style compensation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rsavq_core.progress import check_stop


class Block:
    """The block being quantized: its columns as error feedback left them, and its scaled errors."""

    def __init__(self, w: torch.Tensor, hinv: torch.Tensor, start: int, stop: int) -> None:
        self.w, self.hinv, self.start, self.stop = w, hinv, start, stop
        self.values = w[:, start:stop].clone()  # [M, B], kept current by the in-block updates
        self.errors = torch.zeros_like(self.values)  # [M, B], applied to later blocks at the end

    def current(self, col: int, stop: int) -> torch.Tensor:
        """[M, stop - col]: columns [col, stop) as they stand now, pending updates included.

        ``col`` is the column about to be quantized; columns past this block receive the updates
        of this block's finished columns here, before the block's end applies them.
        """
        i = col - self.start
        cur = self.values[:, i : min(stop, self.stop) - self.start]
        if stop > self.stop:
            rest = self.w[:, self.stop : stop] - self.errors[:, :i] @ self.hinv[self.start : col, self.stop : stop]
            cur = torch.cat([cur, rest], 1)
        return cur


# (column index, its current values [M], the block) -> its quantized values [M], same dtype
QuantizeColumn = Callable[[int, torch.Tensor, Block], torch.Tensor]


def quantize_columns(
    w: torch.Tensor,  # [M, N] float32/float64: the weights; columns right of each block get the feedback
    hinv: torch.Tensor,  # [N, N] upper factor of H⁻¹ (``linalg.inverse_hessian_factor``), w's dtype
    quantize: QuantizeColumn,
    block_size: int = 128,
) -> None:
    """Run the loop over every column; ``quantize`` records what it chose for each."""
    n = w.shape[1]
    for b1 in range(0, n, block_size):
        check_stop()  # a cancelled job stops between column blocks, not after the layer
        b2 = min(b1 + block_size, n)
        block = Block(w, hinv, b1, b2)
        hinv1 = hinv[b1:b2, b1:b2]
        for i in range(b2 - b1):
            values = block.values[:, i]
            quantized = quantize(b1 + i, values, block)
            err = (values - quantized) / hinv1[i, i]
            block.values[:, i + 1 :] -= err[:, None] * hinv1[i, i + 1 :][None, :]
            block.errors[:, i] = err
        w[:, b2:] -= block.errors @ hinv[b1:b2, b2:]
