"""A float model evaluated without ever being whole in memory: a causal LM whose forward streams
the decoder blocks from the checkpoint's files, one at a time.

For the full-precision baseline of a job on a model bigger than memory (its perplexity and
zero-shot accuracy beside the quantized model's). Each forward reads every block once, so its
cost is one pass over the checkpoint's files per batch (perplexity's batches are 4 windows);
embeddings, final norm and head are read once and kept.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from rsavq_core.calibration.block_io import first_tensor
from rsavq_core.calibration.streamed import head_logits, record_boundary
from rsavq_core.models.streamed import StreamedModel


class StreamedCausalLM(nn.Module):
    """``forward(input_ids [B, T] int64, attention_mask [B, T] | None) -> .logits [B, T, vocab]``."""

    def __init__(self, folder: Path, device: torch.device, streamed: StreamedModel | None = None) -> None:
        """``streamed``: a run's own streamed model of ``folder`` to forward with (not read again)."""
        super().__init__()
        # not a submodule: its meta weights stay out of .parameters()
        self._streamed = streamed if streamed is not None else StreamedModel(folder, device=device)
        self._streamed.load_rest()
        self.register_buffer("_device_marker", torch.zeros(0, device=device), persistent=False)
        self.config = self._streamed.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        streamed = self._streamed
        (hidden,), kwargs = record_boundary(streamed, input_ids, input_ids.shape[0], attention_mask)
        output: object = hidden
        with torch.no_grad():
            for index in range(len(streamed.layout.blocks)):
                with streamed.block(index) as block:
                    output = block(hidden, **kwargs[index][0])
                hidden = first_tensor(output)
            extra = {"attention_mask": attention_mask.to(streamed.device)} if attention_mask is not None else {}
            logits = head_logits(streamed, hidden, input_ids, output, **extra)
        return SimpleNamespace(logits=logits)
