"""Compute dtypes, in one place.

What runs in which precision:

* **Calibration forwards and backwards** (the block passes that record boundary activations and
  the gradients for Fisher statistics): the *compute dtype*. ``float32`` on the CPU; on a GPU,
  ``bfloat16`` by default (``RSAVQ_COMPUTE_DTYPE=auto``): matrix products run in bf16 under
  ``torch.autocast``, while the weights, the residual stream, the norms and the loss stay float32.
  float16 is not offered: the per-token loss gradients (about 1/T each) underflow it without loss
  scaling.
* **Statistics accumulators** (Gram matrices, Fisher factors): float32 always; autocast is switched
  off inside them (``full_precision``), and bf16 gradients are widened before they are summed.
* **The quantizer** (k-means, the GPTQ / VQ column loops, least-squares refits): float32 weights;
  the error feedback's inverse-Hessian factor in float64 (``algorithms.linalg``).
* **Block fine-tuning, the walker and evaluation**: float32 (not yet under the compute dtype).

Statistics computed in another compute dtype are other statistics: the dtype is part of their cache
key. In float32 the results are bit-for-bit those of a build without this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import wraps
from typing import ParamSpec, TypeVar

import torch

from rsavq_core.errors import ConfigError

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
P = ParamSpec("P")
R = TypeVar("R")


def resolve_compute_dtype(name: str, device: torch.device) -> str:
    """``float32`` or ``bfloat16`` for ``name`` (one of ``COMPUTE_DTYPES``) on ``device``."""
    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"compute dtype {name!r}: choose one of {', '.join(COMPUTE_DTYPES)}")
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


@contextlib.contextmanager
def forward_precision(dtype: str, device_type: str) -> Iterator[None]:
    """Within the block, matrix products run in ``dtype`` (autocast); nothing changes for float32."""
    if dtype == "float32":
        yield
        return
    with torch.autocast(device_type=device_type, dtype=getattr(torch, dtype)):
        yield


def full_precision(method: Callable[P, R]) -> Callable[P, R]:
    """Runs ``method`` with autocast off (accumulators called from hooks inside a bf16 forward)."""

    @wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return method(*args, **kwargs)

    return wrapper
