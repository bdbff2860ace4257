"""``QuantLinear``: a quantized nn.Linear replacement, and loading a packed checkpoint into a model.

The packed indices/codes live in buffers (so ``.to(device)`` moves them). On a CUDA device (or
on CPU with ``RSAVQ_KERNELS=interpret``) forward goes through the Triton kernels
(``kernels.dispatch``: fused codebook / scalar GEMV for decode, dequantize + GEMM for prefill)
and the weight is never kept expanded. Everywhere else the reference path dequantizes the
weight once, caches it and calls ``F.linear`` (on CPU that is faster than dequantizing per call).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kernels.dispatch import kernel_linear, kernel_supported
from kernels.scalar_reference import PackedScalar
from kernels.vq_layout import MAX_CODE_BITS, PackedVQ, build_packed_vq
from rsavq_core.artifact import Artifact, read_artifact
from rsavq_core.errors import ArtifactError, ConfigError, UnsupportedShapeError
from rsavq_core.layers import QuantizedLayer, ScalarLayer, VQGroup, VQLayer
from rsavq_core.packing import pack_codes, packed_words, unpack_codes

log = logging.getLogger(__name__)


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored quantized (VQ or scalar), as packed buffers.

    Buffers: VQ ``perm`` [N] int64, ``g<i>_codebooks`` [n_pq, K_i, d] fp16 and ``g<i>_indices``
    (int32 packed words); scalar ``codes`` (int32 packed words), ``scales`` / ``zeros``
    [M, ceil(N / group_size)] fp16; ``bias`` [M] fp16 or None.

    With ``cache_weight`` (default) the dequantized weight is kept per (device, dtype) after the
    first forward: on CPU, re-dequantizing per call costs more than the matmul itself. The cache
    is dropped whenever the module's tensors move or change (``.to``, ``.half``, load_state_dict).
    """

    def __init__(
        self, layer: QuantizedLayer, cache_weight: bool = True, packed: dict[str, torch.Tensor] | None = None
    ) -> None:
        """``packed`` optionally gives the int32 words of ``g<i>_indices`` / ``codes`` already
        packed from this layer's codes (``Artifact.packed``), which saves packing them again."""
        super().__init__()
        packed = packed or {}

        def words(key: str, codes: torch.Tensor, bits: int) -> torch.Tensor:
            stream = packed.get(key)
            if stream is None:
                return pack_codes(codes.detach(), bits)
            if stream.dtype != torch.int32 or stream.numel() != packed_words(codes.numel(), bits):
                raise UnsupportedShapeError(
                    f"packed {key} holds {stream.numel()} {stream.dtype} words, "
                    f"expected {packed_words(codes.numel(), bits)} int32"
                )
            return stream.reshape(-1)

        self.kind = layer.kind
        self.out_features, self.in_features = layer.out_features, layer.in_features
        self.cache_weight = cache_weight
        self._cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._kernel_layout: PackedVQ | PackedScalar | None = None
        if isinstance(layer, VQLayer):
            self.vector_len, self.n_pq = layer.vector_len, layer.n_pq
            self.group_specs: list[tuple[int, int, int]] = [(g.bits, g.start, g.stop) for g in layer.groups]
            self.register_buffer("perm", layer.perm.detach().to(torch.int64))
            for i, g in enumerate(layer.groups):
                self.register_buffer(f"g{i}_codebooks", g.codebooks.detach().to(torch.float16))
                stream = words(f"g{i}_indices", g.indices, g.bits * layer.sub_dim)
                self.register_buffer(f"g{i}_indices", stream)
        elif isinstance(layer, ScalarLayer):
            self.bits, self.group_size = layer.bits, layer.group_size
            self.register_buffer("codes", words("codes", layer.codes, layer.bits))
            self.register_buffer("scales", layer.scales.detach().to(torch.float16))
            self.register_buffer("zeros", layer.zeros.detach().to(torch.float16))
        else:
            raise UnsupportedShapeError(f"QuantLinear needs a VQLayer or ScalarLayer, got {type(layer).__name__}")
        bias = layer.bias.detach().to(torch.float16) if layer.bias is not None else None
        self.register_buffer("bias", bias)

    def to_layer(self) -> QuantizedLayer:
        """The in-memory layer (unpacked indices/codes) on the buffers' device."""
        if self.kind == "vq":
            d = self.vector_len // self.n_pq
            n_vectors = -(-self.out_features // self.vector_len)
            groups = []
            for i, (bits, start, stop) in enumerate(self.group_specs):
                count = (stop - start) * n_vectors * self.n_pq
                idx = unpack_codes(getattr(self, f"g{i}_indices"), bits * d, count)
                groups.append(
                    VQGroup(
                        bits,
                        start,
                        stop,
                        getattr(self, f"g{i}_codebooks"),
                        idx.reshape(stop - start, n_vectors, self.n_pq),
                    )
                )
            return VQLayer(
                self.out_features, self.in_features, self.vector_len, self.n_pq, self.perm, groups, self.bias
            )
        m, n = self.out_features, self.in_features
        codes = unpack_codes(self.codes, self.bits, m * n).reshape(m, n).to(torch.uint8)
        return ScalarLayer(m, n, self.bits, self.group_size, codes, self.scales, self.zeros, self.bias)

    @torch.no_grad()
    def _dense_weight(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The dequantized weight [M, N] of ``dtype`` on ``device`` (cached if ``cache_weight``)."""
        key = (torch.device(device), dtype)
        weight = self._cache.get(key)
        if weight is None:
            weight = self.to_layer().dequantize(dtype).to(device)
            if self.cache_weight:
                self._cache[key] = weight
        return weight

    def _packed(self) -> PackedVQ | PackedScalar:
        """The kernels' layout of this layer on the buffers' device, built once.

        For VQ the per-group buffers are then rebound as views into the concatenated streams, so
        the indices and codebooks are held once, not twice.
        """
        if self._kernel_layout is None and self.kind == "scalar":
            self._kernel_layout = PackedScalar(
                self.out_features,
                self.in_features,
                self.bits,
                self.group_size,
                self.codes,
                self.scales,
                self.zeros,
                self.bias,
            )
        if self._kernel_layout is None:
            n = len(self.group_specs)
            books = [getattr(self, f"g{i}_codebooks") for i in range(n)]
            streams = [getattr(self, f"g{i}_indices") for i in range(n)]
            packed = build_packed_vq(
                out_features=self.out_features,
                in_features=self.in_features,
                vector_len=self.vector_len,
                n_pq=self.n_pq,
                groups=self.group_specs,
                perm=self.perm,
                codebooks=books,
                words=streams,
                bias=self.bias,
            )
            word_off = book_off = 0
            for i, (book, stream) in enumerate(zip(books, streams, strict=True)):
                self._buffers[f"g{i}_indices"] = packed.words[word_off : word_off + stream.numel()]
                self._buffers[f"g{i}_codebooks"] = packed.codebooks[book_off : book_off + book.numel()].view(book.shape)
                word_off += stream.numel()
                book_off += book.numel()
            self._kernel_layout = packed
        return self._kernel_layout

    def _uses_kernels(self, x: torch.Tensor) -> bool:
        if self.kind == "vq":
            widest = max(bits for bits, _, _ in self.group_specs) * (self.vector_len // self.n_pq)
            if widest > MAX_CODE_BITS:
                return False
        stream = self.codes if self.kind == "scalar" else self.perm
        return kernel_supported(x, stream.device, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., N] floating -> [..., M] of x's dtype."""
        if self._uses_kernels(x):
            return kernel_linear(x, self._packed())
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self._dense_weight(x.dtype, x.device), bias)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantLinear:
        # .to() / .cuda() / .half() all go through _apply: a cached weight would be stale.
        self._cache.clear()
        self._kernel_layout = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cache.clear()  # buffers are overwritten in place
        self._kernel_layout = None
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, cache_weight={self.cache_weight}"
        )


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_in_place(
    model: nn.Module,
    layers: dict[str, QuantizedLayer],
    cache_weight: bool = True,
    packed: dict[str, dict[str, torch.Tensor]] | None = None,
) -> nn.Module:
    """Swap a QuantLinear in for each ``nn.Linear`` named in ``layers``; returns ``model``.

    Each QuantLinear is placed on the device of the linear it replaces. ``packed`` (per layer, as
    in ``Artifact.packed``) passes already-packed word streams through.
    """
    for name, layer in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as exc:
            raise ConfigError(f"model has no module {name!r} to quantize") from exc
        if not isinstance(old, (nn.Linear, QuantLinear)):
            raise ConfigError(f"{name} is a {type(old).__name__}, not an nn.Linear")
        if (old.out_features, old.in_features) != (layer.out_features, layer.in_features):
            raise UnsupportedShapeError(
                f"{name}: quantized layer is {layer.out_features}x{layer.in_features}, the model's linear "
                f"is {old.out_features}x{old.in_features}"
            )
        device = next(iter(old.buffers() if isinstance(old, QuantLinear) else old.parameters())).device
        qlin = QuantLinear(layer, cache_weight=cache_weight, packed=(packed or {}).get(name))
        _set_module(model, name, qlin.to(device))
    return model


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """Skip random weight init while building a model whose weights are loaded right after.

    Random init of a 135M model takes ~9 s on 2 CPU cores; building it under transformers'
    ``no_init_weights`` takes ~0.05 s (measured here). Non-persistent buffers such as rotary
    ``inv_freq`` are computed in ``__init__`` and stay correct.
    """
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older/newer transformers without it: correct, only slower
        yield
        return
    with no_init_weights():
        yield


def load_quantized_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", cache_weight: bool = True
) -> tuple[nn.Module, Any, Artifact]:
    """(model in eval mode, tokenizer or None, Artifact) from a packed checkpoint directory.

    The model is built on CPU from the checkpoint's ``config.json`` with random init skipped
    (building on the meta device would leave non-persistent buffers such as rotary frequencies
    unmaterialized, and recomputing them is model-specific), then its quantized linears are
    swapped for QuantLinear, the other tensors are loaded (cast to ``dtype``), tied weights are
    re-tied and the whole model is moved to ``device``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    art = read_artifact(path)
    folder = art.path.parent
    if not (folder / "config.json").is_file():
        raise ArtifactError(f"{folder} has no config.json next to {art.path.name}")
    with _skip_init():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)), dtype=dtype)
    quantize_in_place(model, art.layers, cache_weight=cache_weight, packed=art.packed)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in art.other_state.items()}
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ArtifactError(f"{art.path}: tensors the model does not have: {result.unexpected_keys[:5]}")
    prefixes = tuple(f"{name}." for name in art.layers)
    missing = [k for k in result.missing_keys if not k.startswith(prefixes) and k not in art.tied]
    if missing:
        raise ArtifactError(f"{art.path}: the model needs tensors the checkpoint lacks: {missing[:5]}")
    for alias, target in art.tied.items():
        alias_mod, _, alias_attr = alias.rpartition(".")
        target_mod, _, target_attr = target.rpartition(".")
        shared = getattr(model.get_submodule(target_mod), target_attr)
        setattr(model.get_submodule(alias_mod), alias_attr, shared)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    model.to(device).eval()
    tokenizer = None
    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    else:
        log.warning("%s holds no tokenizer files; returning tokenizer=None", folder)
    return model, tokenizer, art
