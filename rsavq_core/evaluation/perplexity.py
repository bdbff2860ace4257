"""Perplexity under the ``wiki-holdout-512`` protocol (``shared/docs/eval_protocol.md``).

The windows come from ``rsavq_core.data.windows.evaluation_windows`` (held-out documents, BOS only where
the tokenizer adds one, 64 non-overlapping windows of 512 tokens). PPL = exp(mean next-token NLL
over every predicted position of every window), accumulated in float32 per batch and in float64
across batches. Other window
counts or lengths are allowed and labelled, e.g. ``wiki-holdout-512[windows=8]``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rsavq_core.data.text_files import EVAL_LEN, EVAL_WINDOWS, TextSource
from rsavq_core.data.windows import EVAL_PROTOCOL, bos_token, evaluation_windows
from rsavq_core.errors import ConfigError
from rsavq_core.progress import Progress

log = logging.getLogger(__name__)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer; quantized modules may hold only buffers)."""
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def output_logits(output: Any) -> torch.Tensor:
    """The logits of a causal LM's forward output: ``.logits`` (transformers) or a bare tensor.

    Returns: [B, T, vocab] in the model's compute dtype.
    """
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ConfigError(
            f"the model's forward returned {type(output).__name__}, which has no "
            "[batch, seq, vocab] '.logits'; only causal language models can be evaluated"
        )
    return logits


def _protocol(source: TextSource | None, n_windows: int, length: int, bos: bool) -> str:
    if source is None:
        return protocol_name(n_windows, length, bos)
    return f"{source.label}-{length}" + ("+bos" if bos else "")


def protocol_name(n_windows: int, length: int, bos: bool = False) -> str:
    """``wiki-holdout-512`` for the protocol's own settings, else that name with the changes labelled
    (``+bos`` when every window starts with the tokenizer's BOS)."""
    if bos:
        return protocol_name(n_windows, length) + "+bos"
    changes = []
    if n_windows != EVAL_WINDOWS:
        changes.append(f"windows={n_windows}")
    if length != EVAL_LEN:
        changes.append(f"length={length}")
    return f"{EVAL_PROTOCOL}[{','.join(changes)}]" if changes else EVAL_PROTOCOL


def window_nll_sum(model: nn.Module, windows: torch.Tensor) -> tuple[float, torch.dtype]:
    """Summed next-token NLL of a batch of windows, and the dtype the model computed its logits in.

    Args:
        windows: [B, L] int64 token ids on the model's device; every position but the first is
            predicted from the ones before it, so the sum covers B * (L - 1) positions.
    """
    logits = output_logits(model(windows))  # [B, L, vocab]
    total = 0.0
    for row in range(windows.shape[0]):
        # One window at a time: logits[row, :-1] is a contiguous view, so only a single
        # [L-1, vocab] float32 upcast / log-softmax is alive on top of the batch's logits.
        pred = logits[row, :-1].float()  # [L-1, vocab] float32 (bf16/fp16 models are scored in fp32 too)
        total += float(F.cross_entropy(pred, windows[row, 1:], reduction="sum").item())
    return total, logits.dtype


def perplexity(
    model: nn.Module,
    tokenizer: object,
    *,
    n_windows: int = EVAL_WINDOWS,
    length: int = EVAL_LEN,
    batch_size: int = 4,
    progress: Progress | None = None,
    source: TextSource | None = None,
) -> dict[str, Any]:
    """Perplexity of a causal LM on the held-out Wikipedia windows (``wiki-holdout-512``), or on
    the first windows of ``source`` (protocol ``<name>@<sha256 prefix>-<length>``, up to
    ``n_windows`` windows: fewer when the text is shorter, reported in ``windows``).

    Args:
        model: any module whose ``forward(input_ids)`` returns ``.logits`` [B, T, vocab] (a
            transformers causal LM, also one whose linears were replaced by quantized modules).
            It is run on its own device, in its own dtype; the NLL is computed in float32.
        tokenizer: the model's tokenizer (called on text, ``add_special_tokens=False``).
        n_windows, length: the protocol's 64 x 512 by default; anything else is labelled in
            ``protocol``.
        batch_size: windows per forward; only one batch of logits ([batch_size, length, vocab])
            is alive at a time.
        progress: called as ``progress("perplexity", windows_done, n_windows)`` after each batch.

    Returns: ``{"protocol", "ppl", "nll" (mean per predicted token), "windows", "tokens" (predicted
    positions, n_windows * (length - 1)), "seq_len", "dtype" (the dtype of the model's logits)}``.
    """
    if n_windows < 1 or length < 2 or batch_size < 1:
        raise ConfigError(
            f"perplexity needs n_windows >= 1, length >= 2 and batch_size >= 1; got "
            f"n_windows={n_windows}, length={length}, batch_size={batch_size}"
        )
    windows = evaluation_windows(tokenizer, n_windows, length, source)  # [n, length] int64
    n_windows = windows.shape[0]
    device = model_device(model)
    total, dtype = 0.0, torch.float32
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, n_windows, batch_size):
                batch = windows[start : start + batch_size].to(device)
                nll, dtype = window_nll_sum(model, batch)
                total += nll  # Python float (float64): no drift across many batches
                done = min(start + batch_size, n_windows)
                log.debug("perplexity: %d/%d windows, running nll %.4f", done, n_windows, total / (done * (length - 1)))
                if progress is not None:
                    progress("perplexity", done, n_windows)
    finally:
        model.train(was_training)
    tokens = n_windows * (length - 1)
    mean_nll = total / tokens
    result = {
        "protocol": _protocol(source, n_windows, length, bos=bos_token(tokenizer) is not None),
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "windows": n_windows,
        "tokens": tokens,
        "seq_len": length,
        "dtype": str(dtype).removeprefix("torch."),
    }
    log.info(
        "perplexity %s: %.4f (%d windows, %d tokens, %s)",
        result["protocol"],
        result["ppl"],
        n_windows,
        tokens,
        result["dtype"],
    )
    return result
