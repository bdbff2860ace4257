"""Choosing a kernel for one quantized linear call: fused GEMV, dequantize + GEMM, or the torch reference.

Both layer kinds have the same three paths: VQ (``vq_triton``, ``vq_reference``) and scalar
RTN/GPTQ (``scalar_triton``, ``scalar_reference``).

* Triton runs when the input is on a CUDA device, its dtype is fp16/bf16/fp32 and the layer's codes fit the
  kernels (``vq_layout.MAX_CODE_BITS``). Anything else takes the reference.
* Up to ``gemv_max_tokens()`` rows of input (decode) use the fused codebook GEMV, which never
  builds the weight; more rows (prefill) dequantize into a scratch weight and call the vendor
  GEMM (tensor cores), whose cost is amortized over the tokens.

``RSAVQ_KERNELS`` picks the policy: ``auto`` (default: Triton on CUDA), ``off`` (the reference
everywhere, e.g. to compare), ``interpret`` (also on CPU when ``TRITON_INTERPRET=1`` was set
before triton was imported: how CI runs model-level checks through the kernels; very slow).

The crossover is a property of the GPU: ``bench/bench_dispatch.py`` measures it and writes
``kernels/dispatch_thresholds.json`` ({gpu name: max GEMV tokens}). A GPU with no entry uses
``DEFAULT_GEMV_MAX_TOKENS``; ``RSAVQ_GEMV_MAX_TOKENS`` overrides both.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.scalar_reference import PackedScalar
from kernels.vq_layout import PackedVQ
from rsavq_core.errors import ConfigError

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Not measured on a GPU yet (none was available when this was written): VPTQ switches to
# dequantize + GEMM from 3 tokens up, AQLM's GEMV is used for single tokens. 4 keeps
# speculative-decoding-sized batches on the GEMV.
DEFAULT_GEMV_MAX_TOKENS = 4
MAX_GEMV_BATCH = 16  # the GEMV keeps a [batch, BLOCK_M] accumulator in registers
THRESHOLDS_FILE = Path(__file__).with_name("dispatch_thresholds.json")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernel_policy() -> str:
    policy = os.environ.get("RSAVQ_KERNELS", "auto")
    if policy not in ("auto", "off", "interpret"):
        raise ConfigError(f"RSAVQ_KERNELS must be auto, off or interpret, got {policy!r}")
    return policy


def kernel_device(device: torch.device) -> bool:
    """Whether the Triton kernels run on ``device`` under the current policy."""
    policy = kernel_policy()
    if policy == "off" or not triton_available():
        return False
    if device.type == "cuda":
        return True
    return policy == "interpret" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def kernel_supported(x: torch.Tensor, weights_device: torch.device, in_features: int) -> bool:
    """Whether the Triton kernels can take x [..., N] against weights held on ``weights_device``."""
    return (
        x.device == weights_device
        and x.shape[-1] == in_features
        and x.dtype in SUPPORTED_DTYPES
        and kernel_device(x.device)
    )


@functools.cache
def gemv_max_tokens(device_name: str) -> int:
    """Largest token count that takes the fused GEMV on the GPU called ``device_name``."""
    if "RSAVQ_GEMV_MAX_TOKENS" in os.environ:
        return int(os.environ["RSAVQ_GEMV_MAX_TOKENS"])
    if THRESHOLDS_FILE.is_file():
        measured = json.loads(THRESHOLDS_FILE.read_text()).get(device_name)
        if measured is not None:
            return int(measured["gemv_max_tokens"])
    log.info("no measured GEMV/GEMM crossover for %r; using %d tokens", device_name, DEFAULT_GEMV_MAX_TOKENS)
    return DEFAULT_GEMV_MAX_TOKENS


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-interpreter"


def kernel_linear(x: torch.Tensor, packed: PackedVQ | PackedScalar) -> torch.Tensor:
    """x: [..., N] -> [..., M] of x's dtype, x @ W.T + bias through the Triton kernels.

    The caller has checked ``kernel_supported`` and otherwise uses the reference
    (``vq_reference`` / ``scalar_reference``), as ``QuantLinear`` does.
    """
    # Imported here: only the kernel path needs triton.
    if isinstance(packed, PackedVQ):
        from kernels.vq_triton import vq_dequantize as dequantize
        from kernels.vq_triton import vq_gemv as gemv
    else:
        from kernels.scalar_triton import scalar_dequantize as dequantize
        from kernels.scalar_triton import scalar_gemv as gemv

    flat = x.reshape(-1, packed.in_features)
    if flat.shape[0] <= min(gemv_max_tokens(device_name(x.device)), MAX_GEMV_BATCH):
        out = gemv(flat, packed)  # type: ignore[arg-type]
    else:
        bias = packed.bias.to(x.dtype) if packed.bias is not None else None
        out = F.linear(flat, dequantize(packed, x.dtype), bias)  # type: ignore[arg-type]
    return out.reshape(*x.shape[:-1], packed.out_features)
