"""Choosing a kernel for one quantized linear call: fused GEMV, dequantize + GEMM, or the torch reference.

Every layer format with kernels offers the same two: a fused GEMV that never builds the weight
(decode) and a dequantizer whose output feeds the vendor GEMM (prefill). This module decides
between them and the reference; it knows nothing of the formats (the caller passes the format's
two functions) and reads no environment (the caller passes a ``KernelPolicy``).

* Triton runs when the policy allows it on the input's device (CUDA; the CPU only under the
  interpreter), the dtype is fp16/bf16/fp32 and the layer sits on the input's device. Anything
  else takes the reference.
* Up to ``gemv_max_tokens`` rows of input use the fused GEMV; more rows dequantize into a
  scratch weight and call the GEMM (tensor cores), whose cost is amortized over the tokens.

The crossover is a property of the GPU: ``bench/bench_dispatch.py`` measures it and writes
``kernels/dispatch_thresholds.json`` ({gpu name: max GEMV tokens}). A GPU with no entry uses
``DEFAULT_GEMV_MAX_TOKENS``; ``KernelPolicy.gemv_max_tokens`` overrides both.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
POLICY_MODES = ("auto", "off", "interpret")
# Not measured on a GPU yet (none was available when this was written): VPTQ switches to
# dequantize + GEMM from 3 tokens up, AQLM's GEMV is used for single tokens. 4 keeps
# speculative-decoding-sized batches on the GEMV.
DEFAULT_GEMV_MAX_TOKENS = 4
MAX_GEMV_BATCH = 16  # the GEMV keeps a [batch, BLOCK_M] accumulator in registers
THRESHOLDS_FILE = Path(__file__).with_name("dispatch_thresholds.json")


@dataclass(frozen=True)
class KernelPolicy:
    """When the Triton kernels run.

    mode: ``auto`` (Triton on CUDA), ``off`` (the reference everywhere, e.g. to compare) or
        ``interpret`` (also on the CPU when ``interpreter`` is set: how CI runs model-level checks
        through the kernels; very slow).
    gemv_max_tokens: overrides the measured GEMV / GEMM crossover when set.
    interpreter: ``TRITON_INTERPRET=1`` was set before triton was imported.
    """

    mode: str = "auto"
    gemv_max_tokens: int | None = None
    interpreter: bool = False

    def __post_init__(self) -> None:
        if self.mode not in POLICY_MODES:
            raise ValueError(f"kernel policy must be one of {', '.join(POLICY_MODES)}, got {self.mode!r}")

    def runs_on(self, device: torch.device) -> bool:
        """Whether the Triton kernels run on ``device`` under this policy."""
        if self.mode == "off" or not triton_available():
            return False
        if device.type == "cuda":
            return True
        return self.mode == "interpret" and device.type == "cpu" and self.interpreter


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernel_supported(x: torch.Tensor, weights_device: torch.device, in_features: int, policy: KernelPolicy) -> bool:
    """Whether the Triton kernels can take x [..., N] against weights held on ``weights_device``."""
    return (
        x.device == weights_device
        and x.shape[-1] == in_features
        and x.dtype in SUPPORTED_DTYPES
        and policy.runs_on(x.device)
    )


@functools.cache
def measured_gemv_max_tokens(device_name: str) -> int:
    """Largest token count that takes the fused GEMV on the GPU called ``device_name``."""
    if THRESHOLDS_FILE.is_file():
        measured = json.loads(THRESHOLDS_FILE.read_text()).get(device_name)
        if measured is not None:
            return int(measured["gemv_max_tokens"])
    log.info("no measured GEMV/GEMM crossover for %r; using %d tokens", device_name, DEFAULT_GEMV_MAX_TOKENS)
    return DEFAULT_GEMV_MAX_TOKENS


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-interpreter"


def kernel_linear(
    x: torch.Tensor,
    layout: Any,
    *,
    gemv: Callable[[torch.Tensor, Any], torch.Tensor],
    dequantize: Callable[[Any, torch.dtype], torch.Tensor],
    policy: KernelPolicy,
) -> torch.Tensor:
    """x: [..., N] -> [..., M] of x's dtype, x @ W.T + bias through the Triton kernels.

    ``layout`` is a format's kernel-side layer (``PackedVQ``, ``PackedScalar``: ``in_features``,
    ``out_features``, ``bias`` [M] float16 or None); ``gemv(x [B, N], layout) -> [B, M]`` adds the
    bias, ``dequantize(layout, dtype) -> [M, N]`` builds the weight. The caller has checked
    ``kernel_supported`` and otherwise uses the format's reference.
    """
    flat = x.reshape(-1, layout.in_features)
    limit = policy.gemv_max_tokens or measured_gemv_max_tokens(device_name(x.device))
    if flat.shape[0] <= min(limit, MAX_GEMV_BATCH):
        out = gemv(flat, layout)
    else:
        bias = layout.bias.to(x.dtype) if layout.bias is not None else None
        out = F.linear(flat, dequantize(layout, x.dtype), bias)
    return out.reshape(*x.shape[:-1], layout.out_features)
