"""Random VQ layers with the real packed layout, for timing kernels and decode (never for quality).

Codes and codebooks are random, so nothing computed from them means anything; their shapes,
code widths, group layout and bytes are those of a real RSAVQ layer (v = 6, two 3-dim
sub-vectors, 4 WCSG groups at the target bits), which is all a timing depends on.
"""

from __future__ import annotations

import torch
from torch import nn

from rsavq_core.formats.vq_layer import VQGroup, VQLayer
from rsavq_core.models.layout import quantizable_linears
from rsavq_core.runtime import quantize_in_place


def random_vq_layer(
    out_features: int,
    in_features: int,
    bits: int,
    *,
    device: torch.device | str = "cpu",
    vector_len: int = 6,
    n_pq: int = 2,
    n_groups: int = 4,
    seed: int = 0,
) -> VQLayer:
    """A VQ layer [out_features, in_features] with every group at ``bits`` bits per weight."""
    gen = torch.Generator(device=device).manual_seed(seed)
    d = vector_len // n_pq
    n_vectors = -(-out_features // vector_len)
    bounds = [round(i * in_features / n_groups) for i in range(n_groups + 1)]
    groups = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        k = 2 ** (bits * d)
        books = (torch.randn(n_pq, k, d, generator=gen, device=device) * 0.02).to(torch.float16)
        idx = torch.randint(0, k, (stop - start, n_vectors, n_pq), generator=gen, device=device)
        groups.append(VQGroup(bits, start, stop, books, idx))
    perm = torch.randperm(in_features, generator=gen, device=device)
    return VQLayer(out_features, in_features, vector_len, n_pq, perm, groups, None)


def quantize_randomly(model: nn.Module, bits: int, device: torch.device | str) -> nn.Module:
    """Swap every decoder-block linear of ``model`` for a random ``bits``-bit QuantLinear."""
    layers = {
        name: random_vq_layer(lin.out_features, lin.in_features, bits, device=device, seed=i)
        for i, (name, lin) in enumerate(quantizable_linears(model))
    }
    return quantize_in_place(model, layers)
