"""The VQ format: RSAVQ / k-means vector quantization with channel groups and product codebooks.

Input channels (columns) are permuted by ``perm`` (WCSG order) and split into contiguous groups;
group g has ``bits`` b_g per weight and ``n_pq`` sub-codebooks of ``2**(b_g*d)`` entries of
dimension d = vector_len / n_pq. Vectors run down the output rows inside one input column (VPTQ
layout, spec §11.1): rows are padded to a multiple of vector_len, cut into vectors of vector_len
rows, and each vector into n_pq sub-vectors of d consecutive rows; sub-vector p of every vector
uses sub-codebook p.

Optionally every output row m has an fp16 scale s_m (AQLM's per-output-channel scales): the codebooks
then quantize W / s (rows of one magnitude share codebook entries better) and W = s * dequantized.

Stored tensors of a layer ``<name>``: ``<name>.perm`` int16 (N <= 32767) / int32 [N], unless the
permutation is the identity (uniform bits: no WCSG order), which is not stored;
``<name>.g<i>.codebooks`` fp16 [n_pq, 2**(b_i*d), d]; ``<name>.g<i>.indices`` int32 words
(``pack_codes`` of the [cols, n_vectors, n_pq] indices, row-major, b_i*d bits per code);
``<name>.row_scale`` fp16 [M] when the layer has row scales; ``<name>.outlier_index`` and
``<name>.outlier_value`` when it has outliers (``rsavq_core.formats.outliers``).
Manifest fields: ``vector_len``, ``n_pq``, ``groups`` [{bits, start, stop, shared?}], ``row_scales``
(bool, absent = false), ``outliers`` (their count, absent = 0), ``identity_perm`` (bool, absent =
false: the ``perm`` tensor is stored). A group with ``shared`` = key uses
codebooks other layers use too (``share_codebooks``), stored once as
``rsavq_shared.<key>.codebooks`` fp16 [n_pq, 2**(b*d), d] instead of ``<name>.g<i>.codebooks``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kernels.packing import pack_codes, unpack_codes
from kernels.vq_layout import MAX_CODE_BITS, PackedVQ, build_packed_vq
from rsavq_core.errors import UnsupportedShapeError
from rsavq_core.formats.base import FP16_BITS, BitCount, LayerFormat, LayerReader, packed_stream, stream_bits
from rsavq_core.formats.outliers import OUTLIER_ENTRY_BITS, Outliers
from rsavq_core.formats.registry import register_format
from rsavq_core.formats.vq_layer import PERM_INT16_MAX_N, VQGroup, VQLayer, perm_dtype_bits, shared_codebook_name


def packed_from_layer(layer: VQLayer, device: torch.device | str | None = None, tile_cols: int = 128) -> PackedVQ:
    """The kernels' layout (``build_packed_vq``) of an in-memory layer, packing its indices."""
    device = layer.perm.device if device is None else torch.device(device)
    return build_packed_vq(
        out_features=layer.out_features,
        in_features=layer.in_features,
        vector_len=layer.vector_len,
        n_pq=layer.n_pq,
        groups=[(g.bits, g.start, g.stop) for g in layer.groups],
        perm=layer.perm.to(device),
        codebooks=[g.codebooks.to(device) for g in layer.groups],
        words=[pack_codes(g.indices, g.bits * layer.sub_dim).to(device) for g in layer.groups],
        bias=layer.bias,
        row_scale=None if layer.row_scale is None else layer.row_scale.to(device),
        outliers=None if layer.outliers is None else (layer.outliers.index.to(device), layer.outliers.value.to(device)),
        tile_cols=tile_cols,
    )


@register_format
class VQFormat(LayerFormat):
    kind = "vq"

    def manifest(self, layer: VQLayer) -> dict[str, Any]:
        groups = [
            {"bits": g.bits, "start": g.start, "stop": g.stop, **({"shared": g.shared} if g.shared is not None else {})}
            for g in layer.groups
        ]
        out: dict[str, Any] = {"vector_len": layer.vector_len, "n_pq": layer.n_pq, "groups": groups}
        if layer.row_scale is not None:
            out["row_scales"] = True
        if layer.outliers is not None:
            out["outliers"] = layer.outliers.count
        if layer.identity_perm:
            out["identity_perm"] = True
        return out

    def tensors(self, layer: VQLayer) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if not layer.identity_perm:
            perm_dtype = torch.int16 if layer.in_features <= PERM_INT16_MAX_N else torch.int32
            out["perm"] = layer.perm.detach().to("cpu", perm_dtype).contiguous()
        for i, g in enumerate(layer.groups):
            want = (g.stop - g.start, layer.n_vectors, layer.n_pq)
            if tuple(g.indices.shape) != want:
                raise UnsupportedShapeError(f"group {i}: indices have shape {tuple(g.indices.shape)}, expected {want}")
            if g.shared is None:
                out[f"g{i}.codebooks"] = g.codebooks.detach().to("cpu", torch.float16).contiguous()
            out[f"g{i}.indices"] = pack_codes(g.indices.detach().cpu(), g.bits * layer.sub_dim)
        if layer.row_scale is not None:
            out["row_scale"] = layer.row_scale.detach().to("cpu", torch.float16).contiguous()
        if layer.outliers is not None:
            out["outlier_index"] = layer.outliers.index.detach().to("cpu", torch.int32).contiguous()
            out["outlier_value"] = layer.outliers.value.detach().to("cpu", torch.float16).contiguous()
        return out

    def read(self, reader: LayerReader, out_features: int, in_features: int, bias: torch.Tensor | None) -> VQLayer:
        e, m, n = reader.entry, out_features, in_features
        v, n_pq = reader.int_(e, "vector_len"), reader.int_(e, "n_pq")
        if v % n_pq:
            raise reader.fail("vector_len", f"{v} is not divisible by n_pq={n_pq}")
        d, n_vectors = v // n_pq, -(-m // v)
        identity = e.get("identity_perm", False)
        if not isinstance(identity, bool):
            raise reader.fail("identity_perm", "must be true or false")
        if identity:
            perm = torch.arange(n)
        else:
            perm = reader.take("perm", (n,), (torch.int16, torch.int32)).to(torch.int64)
            if not torch.equal(perm.sort().values, torch.arange(n)):
                raise reader.fail("perm", f"is not a permutation of 0..{n - 1}")
        specs = e.get("groups")
        if not isinstance(specs, list) or not specs:
            raise reader.fail("groups", "manifest needs a non-empty list of groups")
        groups: list[VQGroup] = []
        for i, spec in enumerate(specs):
            if not isinstance(spec, dict):
                raise reader.fail(f"groups[{i}]", "must be an object")
            bits, start, stop = reader.int_(spec, "bits"), reader.int_(spec, "start", 0), reader.int_(spec, "stop")
            expected_start = groups[-1].stop if groups else 0
            if start != expected_start or stop <= start:
                raise reader.fail(
                    f"groups[{i}]",
                    f"columns [{start}, {stop}) do not continue the previous group at column {expected_start}",
                )
            if not 1 <= bits * d <= 32:
                raise reader.fail(f"g{i}.indices", f"{bits} bits x d={d} is outside [1, 32] bits per code")
            shared = spec.get("shared")
            if shared is not None and not (isinstance(shared, str) and shared):
                raise reader.fail(f"groups[{i}].shared", f"{shared!r} is not a name")
            book_shape = (n_pq, 2 ** (bits * d), d)
            if shared is None:
                cb = reader.take(f"g{i}.codebooks", book_shape, (torch.float16,))
            else:
                cb = reader.shared(f"g{i}.codebooks", shared_codebook_name(shared), book_shape, (torch.float16,))
            count = (stop - start) * n_vectors * n_pq
            idx = reader.codes(f"g{i}.indices", count, bits * d).reshape(stop - start, n_vectors, n_pq)
            groups.append(VQGroup(bits, start, stop, cb, idx, shared))
        if groups[-1].stop != n:
            raise reader.fail("groups", f"cover columns [0, {groups[-1].stop}), expected [0, {n})")
        row_scales = e.get("row_scales", False)
        if not isinstance(row_scales, bool):
            raise reader.fail("row_scales", "must be true or false")
        scale = reader.take("row_scale", (m,), (torch.float16,)) if row_scales else None
        return VQLayer(m, n, v, n_pq, perm, groups, bias, scale, _read_outliers(reader, m, n))

    def stored_bits(self, layer: VQLayer) -> BitCount:
        m, n, d = layer.out_features, layer.in_features, layer.sub_dim
        index = codebooks = padding = 0
        for g in layer.groups:
            code_bits, word_pad = stream_bits(g.indices.numel(), g.bits * d)
            # Codes of real weights: M rows per column; the rest of the stream pads rows up to
            # n_vectors * vector_len.
            real = m * (g.stop - g.start) * g.bits
            index += real
            padding += code_bits - real + word_pad
            codebooks += g.codebooks.numel() * FP16_BITS if g.shared is None else 0  # shared: once per model
        bias_bits = layer.bias.numel() * FP16_BITS if layer.bias is not None else 0
        return BitCount(
            weights=m * n,
            index_bits=index,
            codebook_bits=codebooks,
            perm_bits=0 if layer.identity_perm else n * perm_dtype_bits(n),
            scale_bits=m * FP16_BITS if layer.row_scale is not None else 0,
            outlier_bits=layer.outliers.count * OUTLIER_ENTRY_BITS if layer.outliers is not None else 0,
            bias_bits=bias_bits,
            padding_bits=padding,
        )

    def shared_tensors(self, layer: VQLayer) -> dict[str, torch.Tensor]:
        return {
            shared_codebook_name(g.shared): g.codebooks.detach().to("cpu", torch.float16).contiguous()
            for g in layer.groups
            if g.shared is not None
        }

    def tunable(self, layer: VQLayer) -> dict[str, torch.Tensor]:
        # Shared codebooks are other layers' too: fine-tuning one layer must not change them.
        out = {f"g{i}.codebooks": g.codebooks.float().clone() for i, g in enumerate(layer.groups) if g.shared is None}
        if layer.row_scale is not None:
            out["row_scale"] = layer.row_scale.float().clone()
        if layer.outliers is not None:
            out["outlier_value"] = layer.outliers.value.float().clone()
        return out

    def shared_tunable(self, layer: VQLayer) -> dict[str, tuple[str, torch.Tensor]]:
        return {
            f"g{i}.codebooks": (g.shared, g.codebooks.float().clone())
            for i, g in enumerate(layer.groups)
            if g.shared is not None
        }

    def dequantize_with(self, layer: VQLayer, tunable: Mapping[str, torch.Tensor]) -> torch.Tensor:
        books = [tunable.get(f"g{i}.codebooks", g.codebooks.float()) for i, g in enumerate(layer.groups)]
        return layer.dequantize_books(books, tunable.get("row_scale"), tunable.get("outlier_value"))

    def with_tuned(self, layer: VQLayer, tunable: Mapping[str, torch.Tensor]) -> VQLayer:
        # A shared group's codebooks change only when given (end-to-end fine-tuning trains them
        # jointly for every layer that shares them); block-wise fine-tuning leaves them as they are.
        groups = [
            g
            if f"g{i}.codebooks" not in tunable
            else VQGroup(g.bits, g.start, g.stop, tunable[f"g{i}.codebooks"].detach().half(), g.indices, g.shared)
            for i, g in enumerate(layer.groups)
        ]
        scale = tunable["row_scale"].detach().half() if layer.row_scale is not None else None
        outliers = layer.outliers
        if outliers is not None:
            outliers = Outliers(outliers.index, tunable["outlier_value"].detach().half())
        return VQLayer(
            layer.out_features,
            layer.in_features,
            layer.vector_len,
            layer.n_pq,
            layer.perm,
            groups,
            layer.bias,
            scale,
            outliers,
        )

    def spec(self, layer: VQLayer) -> dict[str, Any]:
        groups = [(g.bits, g.start, g.stop) for g in layer.groups]
        return {
            "vector_len": layer.vector_len,
            "n_pq": layer.n_pq,
            "groups": groups,
            "row_scales": layer.row_scale is not None,
            "outliers": 0 if layer.outliers is None else layer.outliers.count,
        }

    def buffers(self, layer: VQLayer, packed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {"perm": layer.perm.detach().to(torch.int64)}
        if layer.row_scale is not None:
            out["row_scale"] = layer.row_scale.detach().to(torch.float16)
        if layer.outliers is not None:
            out["outlier_index"] = layer.outliers.index.detach().to(torch.int64)
            out["outlier_value"] = layer.outliers.value.detach().to(torch.float16)
        for i, g in enumerate(layer.groups):
            out[f"g{i}_codebooks"] = g.codebooks.detach().to(torch.float16)
            out[f"g{i}_indices"] = packed_stream(packed, f"g{i}_indices", g.indices, g.bits * layer.sub_dim)
        return out

    def from_buffers(
        self,
        spec: dict[str, Any],
        buffers: Mapping[str, torch.Tensor],
        out_features: int,
        in_features: int,
        bias: torch.Tensor | None,
    ) -> VQLayer:
        v, n_pq = spec["vector_len"], spec["n_pq"]
        d, n_vectors = v // n_pq, -(-out_features // v)
        groups = []
        for i, (bits, start, stop) in enumerate(spec["groups"]):
            count = (stop - start) * n_vectors * n_pq
            idx = unpack_codes(buffers[f"g{i}_indices"], bits * d, count).reshape(stop - start, n_vectors, n_pq)
            groups.append(VQGroup(bits, start, stop, buffers[f"g{i}_codebooks"], idx))
        scale = buffers["row_scale"] if spec.get("row_scales") else None
        outliers = Outliers(buffers["outlier_index"], buffers["outlier_value"]) if spec.get("outliers") else None
        return VQLayer(out_features, in_features, v, n_pq, buffers["perm"], groups, bias, scale, outliers)

    def kernel_ready(self, spec: dict[str, Any]) -> bool:
        d = spec["vector_len"] // spec["n_pq"]
        return bool(max(bits for bits, _, _ in spec["groups"]) * d <= MAX_CODE_BITS)

    def kernel_layout(self, module: Any) -> PackedVQ:
        """The layer's groups concatenated for one launch; the module's per-group buffers then
        become views into the concatenated streams, so indices and codebooks are held once."""
        spec, n = module.spec, len(module.spec["groups"])
        books = [getattr(module, f"g{i}_codebooks") for i in range(n)]
        streams = [getattr(module, f"g{i}_indices") for i in range(n)]
        packed = build_packed_vq(
            out_features=module.out_features,
            in_features=module.in_features,
            vector_len=spec["vector_len"],
            n_pq=spec["n_pq"],
            groups=spec["groups"],
            perm=module.perm,
            codebooks=books,
            words=streams,
            bias=module.bias,
            row_scale=getattr(module, "row_scale", None) if spec.get("row_scales") else None,
            outliers=(module.outlier_index, module.outlier_value) if spec.get("outliers") else None,
        )
        word_off = book_off = 0
        for i, (book, stream) in enumerate(zip(books, streams, strict=True)):
            module._buffers[f"g{i}_indices"] = packed.words[word_off : word_off + stream.numel()]
            module._buffers[f"g{i}_codebooks"] = packed.codebooks[book_off : book_off + book.numel()].view(book.shape)
            word_off += stream.numel()
            book_off += book.numel()
        return packed

    def kernel_gemv(self, x: torch.Tensor, layout: PackedVQ) -> torch.Tensor:
        from kernels.vq_triton import vq_gemv

        return vq_gemv(x, layout)

    def kernel_dequantize(self, layout: PackedVQ, dtype: torch.dtype) -> torch.Tensor:
        from kernels.vq_triton import vq_dequantize

        return vq_dequantize(layout, dtype)


def _read_outliers(reader: LayerReader, m: int, n: int) -> Outliers | None:
    count = reader.entry.get("outliers", 0)
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= m * n:
        raise reader.fail("outliers", f"manifest value {count!r} is not a count in [0, {m * n}]")
    if count == 0:
        return None
    index = reader.take("outlier_index", (count,), (torch.int32,)).to(torch.int64)
    if int(index.min()) < 0 or int(index.max()) >= m * n or not bool((index[1:] > index[:-1]).all()):
        raise reader.fail("outlier_index", f"positions must increase strictly within [0, {m * n})")
    return Outliers(index, reader.take("outlier_value", (count,), (torch.float16,)))
