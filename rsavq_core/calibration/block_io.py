"""What a decoder block takes and returns, as the calibration hooks see it.

Blocks differ across architectures: some return a tensor, some a tuple starting with the hidden
states; some run their linears on [B, T, N] windows, some (OPT's MLP) on the tokens flattened to
[B·T, N]. These helpers give the statistics one view of all of them.
"""

from __future__ import annotations

import torch

from rsavq_core.errors import CalibrationError


def as_windows(t: torch.Tensor, windows: torch.Size, name: str) -> torch.Tensor:
    """t: [B, T, N], or [B·T, N] from a block that flattens its tokens; returns [B, T, N].
    ``windows``: (B, T) of the block's input. Anything else (a linear that sees only some of the
    tokens, as a routed expert does) is a ``CalibrationError`` naming the linear."""
    if t.dim() == 3 and t.shape[:2] == windows:
        return t
    if t.dim() == 2 and t.shape[0] == windows[0] * windows[1]:
        return t.reshape(windows[0], windows[1], t.shape[1])
    raise CalibrationError(
        f"linear {name!r} ran on a tensor of shape {list(t.shape)} while its block ran on {list(windows)} "
        "windows x tokens: per-window statistics need every token of every window"
    )


def first_tensor(output: object) -> torch.Tensor:
    """The hidden states of a block's output (a tensor, or a tuple/list starting with one)."""
    first = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(first, torch.Tensor):
        raise CalibrationError(f"a decoder block returned {type(first).__name__}, not its hidden states")
    return first


def replace_first(output: object, value: torch.Tensor) -> object:
    """``output`` (a tensor, or a tuple/list starting with one) with ``value`` as its first tensor."""
    if isinstance(output, tuple):
        return (value, *output[1:])
    if isinstance(output, list):
        return [value, *output[1:]]
    return value


def detach_kwargs(kwargs: dict[str, object]) -> dict[str, object]:
    """A block's keyword arguments (masks, rotary embeddings) without their autograd history, and
    without ``hidden_states`` (the recorded input is kept apart)."""

    def detach(v: object) -> object:
        if isinstance(v, torch.Tensor):
            return v.detach()
        if isinstance(v, tuple):
            return tuple(detach(e) for e in v)
        return v

    return {k: detach(v) for k, v in kwargs.items() if k != "hidden_states"}
