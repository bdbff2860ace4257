"""On-disk cache of calibration statistics, one safetensors file per decoder block.

Keyed by (model fingerprint, calibration tokens hash, n samples, length, Fisher form, contents),
so a second bit budget — or a second method — for the same model reuses the statistics. A store
is complete only once ``meta.json`` is written (after every block), so a crash mid-way never
leaves a store that looks usable. Blocks are computed last to first with the gradient flowing
down, so a partial store cannot be resumed block-wise: an incomplete one is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from rsavq_core.atomic import replacing
from rsavq_core.calibration.statistics import LayerStats, block_statistics, record_block_inputs
from rsavq_core.errors import CalibrationError
from rsavq_core.models.files import cache_root
from rsavq_core.models.layout import find_decoder_layout
from rsavq_core.precision import forward_precision
from rsavq_core.progress import Progress

log = logging.getLogger(__name__)
STATS_VERSION = "2"  # 2: the first-token Hessian
_FIELDS = ("grad_mean", "fisher_out", "fisher_in", "hessian", "hessian_first")


@dataclass(frozen=True)
class StatsKey:
    fingerprint: str  # model_fingerprint of the checkpoint
    tokens_hash: str  # data.tokens_hash of the calibration windows
    n_samples: int
    seq_len: int
    fisher: str  # "exact" | "kfac"
    with_grads: bool  # False: activation Hessians only (enough for rtn/gptq)
    compute_dtype: str = "float32"  # of the forwards that produced them (``rsavq_core.precision``)

    def digest(self) -> str:
        raw = json.dumps(
            [
                STATS_VERSION,
                self.fingerprint,
                self.tokens_hash,
                self.n_samples,
                self.seq_len,
                self.fisher if self.with_grads else "-",
                self.with_grads,
            ]
            # float32 keys keep the digests they had before the compute dtype existed
            + ([] if self.compute_dtype == "float32" else [self.compute_dtype])
        )
        return hashlib.sha256(raw.encode()).hexdigest()[:20]


class StatsStore:
    """A folder ``<root>/<digest>/`` with ``block_XXXX.safetensors`` files and ``meta.json``."""

    def __init__(self, key: StatsKey, root: Path | None = None) -> None:
        self.key = key
        self.folder = (root or cache_root() / "stats") / key.digest()

    @classmethod
    def find(cls, key: StatsKey, root: Path | None = None) -> StatsStore | None:
        """A complete store for ``key``; one with gradients also serves a Hessian-only request."""
        candidates = (
            [key]
            if key.with_grads
            else [
                key,
                StatsKey(**{**key.__dict__, "with_grads": True}),
                StatsKey(
                    **{**key.__dict__, "with_grads": True, "fisher": "kfac" if key.fisher == "exact" else "exact"}
                ),
            ]
        )
        for k in candidates:
            store = cls(k, root)
            if store.complete():
                return store
        return None

    def complete(self) -> bool:
        return (self.folder / "meta.json").is_file()

    def block_file(self, index: int) -> Path:
        return self.folder / f"block_{index:04d}.safetensors"

    def save_block(self, index: int, stats: dict[str, LayerStats]) -> None:
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, st in stats.items():
            for f in _FIELDS:
                value = getattr(st, f)
                if value is not None:
                    # K-FAC's input factor is the activation Hessian itself (both E[x xᵀ]);
                    # safetensors refuses shared storage, so a second reference is stored as a copy.
                    ptr = value.untyped_storage().data_ptr()
                    tensors[f"{name}::{f}"] = value.clone() if ptr in seen else value.contiguous()
                    seen.add(ptr)
            tensors[f"{name}::tau"] = torch.tensor([st.tau, st.n_samples, st.n_tokens], dtype=torch.float64)
        with replacing(self.block_file(index)) as tmp:  # a name of this writer's own (two workers may race)
            save_file(tensors, str(tmp))

    def load_block(self, index: int) -> dict[str, LayerStats]:
        """Statistics of block ``index`` by linear name relative to the block."""
        try:
            raw = load_file(str(self.block_file(index)))
        except (OSError, SafetensorError) as exc:
            raise CalibrationError(f"cannot read cached statistics {self.block_file(index)}: {exc}") from exc
        names = sorted({k.split("::")[0] for k in raw})
        out = {}
        for name in names:
            tau, n_samples, n_tokens = raw[f"{name}::tau"].tolist()
            out[name] = LayerStats(
                grad_mean=raw.get(f"{name}::grad_mean"),
                fisher_out=raw.get(f"{name}::fisher_out"),
                fisher_in=raw.get(f"{name}::fisher_in"),
                tau=tau,
                hessian=raw.get(f"{name}::hessian"),
                hessian_first=raw.get(f"{name}::hessian_first"),
                n_samples=int(n_samples),
                n_tokens=int(n_tokens),
            )
        return out

    def finish(self, meta: dict[str, object]) -> None:
        (self.folder / "meta.json").write_text(json.dumps({**self.key.__dict__, **meta}, indent=1))


def compute_statistics(
    model: nn.Module,
    tokens: torch.Tensor,
    key: StatsKey,
    *,
    micro_batch: int = 4,
    root: Path | None = None,
    progress: Progress | None = None,
) -> StatsStore:
    """Fill (or reuse) the store for ``key``. tokens: [S, T] int64 calibration windows."""
    existing = StatsStore.find(key, root)
    if existing is not None:
        log.info("reusing cached calibration statistics %s", existing.folder)
        return existing
    store = StatsStore(key, root)
    blocks = find_decoder_layout(model).blocks
    started = time.perf_counter()
    with forward_precision(key.compute_dtype, tokens.device.type):
        inputs, kwargs, grads = record_block_inputs(
            model, tokens, micro_batch=micro_batch, want_grads=key.with_grads, progress=progress
        )
        for done, index in enumerate(reversed(range(len(blocks)))):
            stats, grads = block_statistics(
                blocks[index], inputs[index], kwargs[index], grads, fisher=key.fisher, seq_len=tokens.shape[1]
            )
            store.save_block(index, stats)
            inputs[index] = []  # free this block's activations as soon as they are used
            if progress:
                progress("calibration statistics", done + 1, len(blocks))
    store.finish({"seconds": time.perf_counter() - started, "blocks": len(blocks)})
    return store
