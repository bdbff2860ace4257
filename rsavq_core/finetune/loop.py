"""The one training loop of fine-tuning: Adam steps over a fixed schedule of micro-batches.

Step ``s`` trains on what ``loss_of(s)`` returns (the caller maps steps to micro-batches, ``s mod
n``), so a run is deterministic for a given input, and a run resumed at ``start`` with the
optimizer's saved state ends where an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rsavq_core.progress import Progress


def adam_steps(
    optimizer: torch.optim.Optimizer,
    loss_of: Callable[[int], torch.Tensor],  # step -> scalar loss with a graph to the trained tensors
    *,
    steps: int,
    start: int = 0,
    after_step: Callable[[int], None] | None = None,  # called with the number of steps done
    progress: Progress | None = None,
    stage: str = "fine-tune",
    metric: str = "loss",  # what the progress detail calls the loss
) -> None:
    """Steps ``start`` .. ``steps - 1``: zero the gradients, backward through ``loss_of(step)``, step."""
    with torch.enable_grad():
        for step in range(start, steps):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of(step)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(step + 1)
            if progress:
                progress(stage, step + 1, steps, {metric: loss.item()})
