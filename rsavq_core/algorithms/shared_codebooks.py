"""Codebooks shared across the blocks of one layer type (``share_codebooks``).

A per-layer codebook of 2^12 entries of 6 dimensions costs 0.2 bpw on a 576 x 576 layer, more
than the index bits it saves; shared by the 30 q_proj layers of a model it costs a thirtieth of
that. So one set of codebooks per layer type (every block's ``self_attn.q_proj``, ...) is fitted
on a sample of all of them, before the per-block pass, in the run's metric and on the run's
targets (EDSG shift, row scales: ``vq_targets``). The per-block pass then assigns each layer's
codes against them (with error feedback); the codebooks are neither refit nor fine-tuned per
layer, since the other layers use them too.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from rsavq_core.algorithms.kmeans import weighted_kmeans
from rsavq_core.algorithms.vq_options import VQOptions
from rsavq_core.algorithms.vq_targets import prepare_layer
from rsavq_core.calibration.statistics import LayerStats
from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.errors import ConfigError
from rsavq_core.formats.vq_layer import to_subvectors
from rsavq_core.progress import Progress

# Sub-vectors sampled per codebook entry for the shared fit (spread evenly over the layers of the
# type): 64 per entry is 8x what a per-layer fit samples for its Lloyd rounds (``kmeans_fit_points``)
# and keeps a 2^12-entry fit to seconds per round on 2 CPU cores.
SHARED_FIT_POINTS_PER_ENTRY = 64


@dataclass
class SharedCodebooks:
    """The codebooks every layer of one type uses."""

    name: str  # the layer type: the layer's name inside its block, e.g. "self_attn.q_proj"
    books: list[torch.Tensor]  # per channel group: [n_pq, K, d] float16

    def key(self, group: int) -> str:
        """The stored name of group ``group``'s codebooks (``formats.vq_layer.shared_codebook_name``)."""
        return f"{self.name}.g{group}"

    def group(self, group: int, bits: int, n_pq: int, d: int) -> torch.Tensor:
        """Group ``group``'s codebooks [n_pq, 2^(bits·d), d] float16, checked against the layer's group."""
        want = (n_pq, 2 ** (bits * d), d)
        if group >= len(self.books) or tuple(self.books[group].shape) != want:
            have = tuple(self.books[group].shape) if group < len(self.books) else "none"
            raise ConfigError(f"{self.name}: group {group} needs shared codebooks of shape {want}, has {have}")
        return self.books[group]


class SharedCodebookFit:
    """Collects a sample of every layer's sub-vectors by type (``add``), then fits (``fit``)."""

    def __init__(self, cfg: QuantConfig, layers_per_type: int) -> None:
        o = cfg.options_as(VQOptions)
        if not float(cfg.bits).is_integer():
            raise ConfigError(f"shared codebooks need whole bits per weight, got {cfg.bits:g}")
        self.cfg, self.options = cfg, o
        self.entries = 2 ** (int(cfg.bits) * o.sub_dim)
        self.per_layer = math.ceil(SHARED_FIT_POINTS_PER_ENTRY * self.entries / max(layers_per_type, 1))
        self.gen = torch.Generator().manual_seed(cfg.seed)
        # type -> group -> sub-vector p -> sampled (points [L, d], weights [L, d] or None)
        self.samples: dict[str, list[list[list[tuple[torch.Tensor, torch.Tensor | None]]]]] = {}

    def add(self, name: str, weight: torch.Tensor, stats: LayerStats | None) -> None:
        """Sample one layer of type ``name``. weight: [M, N] floating."""
        o, v = self.options, self.options.vector_length
        n_pq, d = o.sub_vectors, o.sub_dim
        t = prepare_layer(weight, stats, self.cfg)
        by_group = self.samples.setdefault(name, [])
        for gi, (start, stop) in enumerate(t.alloc.bounds):
            if gi == len(by_group):
                by_group.append([[] for _ in range(n_pq)])
            sub_t = to_subvectors(t.target[:, start:stop], v, n_pq)
            sub_o = to_subvectors(t.metric[:, start:stop], v, n_pq) if t.metric is not None else None
            for p in range(n_pq):
                pts = sub_t[:, :, p].reshape(-1, d)
                pick = torch.randperm(pts.shape[0], generator=self.gen)[: self.per_layer].to(pts.device)
                wts = sub_o[:, :, p].reshape(-1, d)[pick] if sub_o is not None else None
                by_group[gi][p].append((pts[pick], wts))

    def fit(self, finished: dict[str, Any], progress: Progress | None = None) -> dict[str, SharedCodebooks]:
        """One weighted k-means per (type, group, sub-vector) on the samples; fp16 as stored.

        ``finished``: type -> a layer of it that an interrupted run already finished (a VQLayer):
        its codebooks are the type's, so a resumed run goes on with the codebooks it started with.
        """
        out = {}
        for name, parts in self.samples.items():
            layer = finished.get(name)
            if layer is not None:
                out[name] = SharedCodebooks(name, [g.codebooks for g in layer.groups])
                continue
            # Each type draws from its own generator: its codebooks do not depend on which other
            # types were fitted (or resumed) before it.
            gen = torch.Generator().manual_seed(self.cfg.seed ^ zlib.crc32(name.encode()))
            books = []
            for per_p in parts:
                fitted = []
                for sampled in per_p:
                    pts = torch.cat([p for p, _ in sampled])
                    wts = None
                    if any(w is not None for _, w in sampled):  # layers without a metric weigh 1
                        wts = torch.cat([torch.ones_like(p) if w is None else w for p, w in sampled])
                    fitted.append(weighted_kmeans(pts, wts, self.entries, self.options.kmeans_iters, gen))
                books.append(torch.stack(fitted).half())
            out[name] = SharedCodebooks(name, books)
            if progress:
                progress("shared codebooks: fit", len(out), len(self.samples))
        return out
