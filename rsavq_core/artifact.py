"""The packed checkpoint: one directory, one safetensors file, the config in its metadata.

Layout of ``<out_dir>/``: ``config.json`` (+ ``generation_config.json``) of the source model,
the tokenizer files, and ``rsavq.safetensors`` holding every tensor. The safetensors metadata
(all str -> str) carries ``format`` = "rsavq", ``format_version``, ``method``, ``config``
(QuantConfig JSON), ``layers`` (JSON manifest, see ``manifest_entry``), ``source_model``,
``tied`` (JSON {alias: stored name}) and any caller-supplied extras. Loading dispatches on this
metadata only, never on a file name (style convention 2).

Tensor names, for a quantized layer ``<name>``:
  VQ      ``<name>.perm`` int16 (N <= 32767) / int32 [N];
          ``<name>.g<i>.codebooks`` fp16 [n_pq, 2**(b_i*d), d];
          ``<name>.g<i>.indices`` int32 words: pack_codes of the [cols, n_vectors, n_pq] indices
          (row-major), b_i*d bits per code;
  scalar  ``<name>.codes`` int32 words (pack_codes of the [M, N] codes, ``bits`` per code),
          ``<name>.scales``, ``<name>.zeros`` fp16 [M, ceil(N / group_size)];
  both    ``<name>.bias`` fp16 [M] when the layer has one.
Every other state_dict entry is stored under its own name: floating tensors as fp16, integer
ones unchanged; tensors tied to an earlier entry are stored once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from rsavq_core.bitcount import PERM_INT16_MAX_N
from rsavq_core.canonical import save_canonical
from rsavq_core.config import QuantConfig
from rsavq_core.errors import ArtifactError, ConfigError, UnsupportedShapeError
from rsavq_core.layers import QuantizedLayer, ScalarLayer, VQGroup, VQLayer
from rsavq_core.packing import pack_codes, packed_words, unpack_codes

log = logging.getLogger(__name__)

FORMAT = "rsavq"
FORMAT_VERSION = "1"
SUPPORTED_VERSIONS: tuple[str, ...] = ("1",)
WEIGHTS_FILE = "rsavq.safetensors"
_RESERVED = ("format", "format_version", "method", "config", "layers", "source_model", "tied")


@dataclass
class Artifact:
    """A checkpoint read back: layers hold unpacked indices/codes (int64 / uint8)."""

    path: Path  # the safetensors file
    metadata: dict[str, str]
    config: QuantConfig
    layers: dict[str, QuantizedLayer]
    other_state: dict[str, torch.Tensor]  # non-quantized state_dict entries, as stored
    tied: dict[str, str]  # alias -> name of the stored tensor it shares
    # layer -> {"g<i>_indices" | "codes": int32 words as stored}, validated against the manifest,
    # so that QuantLinear can take them without packing the unpacked codes again.
    packed: dict[str, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)


def manifest_entry(layer: QuantizedLayer) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "kind": layer.kind,
        "out_features": layer.out_features,
        "in_features": layer.in_features,
        "has_bias": layer.bias is not None,
    }
    if isinstance(layer, VQLayer):
        entry.update(
            vector_len=layer.vector_len,
            n_pq=layer.n_pq,
            groups=[{"bits": g.bits, "start": g.start, "stop": g.stop} for g in layer.groups],
        )
    else:
        entry.update(bits=layer.bits, group_size=layer.group_size)
    return entry


def layer_tensors(name: str, layer: QuantizedLayer) -> dict[str, torch.Tensor]:
    """The packed tensors of one layer, keyed by their names in the file."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(layer, VQLayer):
        perm_dtype = torch.int16 if layer.in_features <= PERM_INT16_MAX_N else torch.int32
        out[f"{name}.perm"] = layer.perm.detach().to("cpu", perm_dtype).contiguous()
        for i, g in enumerate(layer.groups):
            want = (g.stop - g.start, layer.n_vectors, layer.n_pq)
            if tuple(g.indices.shape) != want:
                raise UnsupportedShapeError(
                    f"layer {name} group {i}: indices have shape {tuple(g.indices.shape)}, expected {want}"
                )
            out[f"{name}.g{i}.codebooks"] = g.codebooks.detach().to("cpu", torch.float16).contiguous()
            out[f"{name}.g{i}.indices"] = pack_codes(g.indices.detach().cpu(), g.bits * layer.sub_dim)
    elif isinstance(layer, ScalarLayer):
        out[f"{name}.codes"] = pack_codes(layer.codes.detach().cpu(), layer.bits)
        out[f"{name}.scales"] = layer.scales.detach().to("cpu", torch.float16).contiguous()
        out[f"{name}.zeros"] = layer.zeros.detach().to("cpu", torch.float16).contiguous()
    else:
        raise UnsupportedShapeError(f"layer {name}: cannot pack {type(layer).__name__}")
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach().to("cpu", torch.float16).contiguous()
    return out


def _other_tensors(model: nn.Module, skip: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Non-quantized state_dict entries (fp16 if floating) and the {alias: stored name} of ties."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for key, t in model.state_dict().items():
        if key.startswith(skip):
            continue  # the quantized layers' original weight/bias, or their QuantLinear buffers
        ident = (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        if t.is_floating_point():
            # copy=True: the file must not share storage with the model or between entries.
            half = t.detach().to("cpu", torch.float16, copy=True)
            if bool(torch.isfinite(t).all()) and not bool(torch.isfinite(half).all()):
                log.warning("%s overflows float16; stored values are not finite", key)
            tensors[key] = half.contiguous()
        else:
            tensors[key] = t.detach().to("cpu", copy=True).contiguous()
    return tensors, tied


def save_artifact(
    out_dir: str | Path,
    *,
    model: nn.Module,
    tokenizer: Any,
    layers: dict[str, QuantizedLayer],
    config: QuantConfig,
    source_model: str,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write the packed checkpoint to ``out_dir`` atomically and return ``out_dir``.

    Everything is written into a temporary sibling directory first; an existing ``out_dir`` is
    replaced only once that succeeded, so a crash never leaves a half-written checkpoint.
    ``model`` may be the FP model or one with QuantLinear modules already swapped in.
    """
    out = Path(out_dir)
    extra = dict(extra_metadata or {})
    for key, value in extra.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(f"extra metadata must map str to str, got {key!r}: {type(value).__name__}")
        if key in _RESERVED:
            raise ConfigError(f"extra metadata key {key!r} is reserved by the format")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        tensors.update(layer_tensors(name, layer))
    other, tied = _other_tensors(model, tuple(f"{name}." for name in layers))
    clash = sorted(set(other) & set(tensors))
    if clash:
        raise ConfigError(f"tensor names clash between quantized layers and model state: {clash[:5]}")
    tensors.update(other)
    metadata = {
        **extra,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": config.method,
        "config": config.to_json(),
        "source_model": source_model,
        "layers": json.dumps({name: manifest_entry(layer) for name, layer in layers.items()}),
        "tied": json.dumps(tied),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_canonical(tensors, tmp / WEIGHTS_FILE, metadata)  # same content, same bytes (sha256)
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        if out.exists():
            out.rename(old)  # two renames: the old checkpoint is removed only once the new one is in place
        try:
            tmp.rename(out)
        except OSError:
            if old.exists():
                old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s (%d tensors, %d quantized layers)", out, len(tensors), len(layers))
    return out


def read_artifact(path: str | Path) -> Artifact:
    """Read and validate a checkpoint directory (or its ``rsavq.safetensors`` file directly)."""
    file = Path(path)
    if file.is_dir():
        file = file / WEIGHTS_FILE
    if not file.is_file():
        raise ArtifactError(f"no packed checkpoint at {file}")
    try:
        with safe_open(str(file), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            _check_header(metadata, file)
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{file}: unreadable safetensors file (truncated or corrupt?): {exc}") from exc
    manifest = _json(metadata, "layers", file)
    tied = _json(metadata, "tied", file) if "tied" in metadata else {}
    try:
        config = QuantConfig.from_dict(_json(metadata, "config", file))
    except (ConfigError, TypeError) as exc:
        raise ArtifactError(f"{file}: invalid config in metadata: {exc}") from exc
    readers = {name: LayerReader(file, name, entry, tensors) for name, entry in manifest.items()}
    layers = {name: reader.read() for name, reader in readers.items()}
    prefixes = tuple(f"{name}." for name in manifest)
    stray = sorted(key for key in tensors if key.startswith(prefixes))
    if stray:
        raise ArtifactError(f"{file}: tensors not described by the layer manifest: {stray[:5]}")
    for alias, target in tied.items():
        if not isinstance(target, str) or target not in tensors:
            raise ArtifactError(f"{file}: {alias} is tied to {target}, which is not stored")
    return Artifact(
        path=file,
        metadata=metadata,
        config=config,
        layers=layers,
        other_state=tensors,
        tied=tied,
        packed={name: reader.packed for name, reader in readers.items()},
    )


def _check_header(metadata: dict[str, str], file: Path) -> None:
    if metadata.get("format") != FORMAT:
        raise ArtifactError(f"{file}: not an rsavq checkpoint (metadata format={metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise ArtifactError(
            f"{file}: unsupported format_version {version!r}; this version of rsavq "
            f"reads format_version {', '.join(SUPPORTED_VERSIONS)}"
        )


def _json(metadata: dict[str, str], key: str, file: Path) -> dict[str, Any]:
    try:
        value = json.loads(metadata[key])
    except KeyError as exc:
        raise ArtifactError(f"{file}: metadata lacks {key!r}") from exc
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{file}: metadata {key!r} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ArtifactError(f"{file}: metadata {key!r} must be a JSON object")
    return value


class LayerReader:
    """Validates one manifest entry against its tensors (popped from ``tensors``) and unpacks it."""

    def __init__(self, file: Path, name: str, entry: Any, tensors: dict[str, torch.Tensor]) -> None:
        self.where, self.name, self.tensors = f"{file}: layer {name}", name, tensors
        if not isinstance(entry, dict):
            raise ArtifactError(f"{self.where}: manifest entry must be an object")
        self.entry = entry
        self.packed: dict[str, torch.Tensor] = {}  # QuantLinear buffer name -> int32 words

    def fail(self, field: str, message: str) -> ArtifactError:
        return ArtifactError(f"{self.where}: {field}: {message}")

    def int_(self, entry: dict[str, Any], key: str, low: int = 1) -> int:
        value = entry.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise self.fail(key, f"manifest value {value!r} is not an integer >= {low}")
        return value

    def take(self, field: str, shape: tuple[int, ...] | None, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
        key = f"{self.name}.{field}"
        if key not in self.tensors:
            raise self.fail(field, f"tensor {key} is missing")
        t = self.tensors.pop(key)
        if t.dtype not in dtypes:
            raise self.fail(field, f"dtype {t.dtype}, expected {' or '.join(map(str, dtypes))}")
        if shape is not None and tuple(t.shape) != shape:
            raise self.fail(field, f"shape {tuple(t.shape)}, expected {shape}")
        return t

    def codes(self, field: str, count: int, bits: int) -> torch.Tensor:
        """Unpack ``count`` codes of ``bits`` bits from the int32 stream ``field``."""
        if not 1 <= bits <= 32:
            raise self.fail(field, f"code width {bits} bits is outside [1, 32]")
        words = self.take(field, None, (torch.int32,))
        needed = packed_words(count, bits)
        if words.dim() != 1 or words.numel() != needed:
            raise self.fail(
                field,
                f"{words.numel()} packed words of shape {tuple(words.shape)}, expected "
                f"a 1-D stream of {needed} for {count} codes of {bits} bits",
            )
        self.packed[field.replace(".", "_")] = words
        return unpack_codes(words, bits, count)

    def read(self) -> QuantizedLayer:
        e = self.entry
        m, n = self.int_(e, "out_features"), self.int_(e, "in_features")
        bias = self.take("bias", (m,), (torch.float16,)) if e.get("has_bias") else None
        if e.get("kind") == "vq":
            return self.read_vq(m, n, bias)
        if e.get("kind") == "scalar":
            bits, gs = self.int_(e, "bits"), self.int_(e, "group_size")
            if bits > 8:
                raise self.fail("bits", f"{bits} bits do not fit the uint8 codes of a scalar layer")
            codes = self.codes("codes", m * n, bits).reshape(m, n).to(torch.uint8)
            n_groups = -(-n // gs)
            scales = self.take("scales", (m, n_groups), (torch.float16,))
            zeros = self.take("zeros", (m, n_groups), (torch.float16,))
            return ScalarLayer(m, n, bits, gs, codes, scales, zeros, bias)
        raise self.fail("kind", f"unknown layer kind {e.get('kind')!r}; expected 'vq' or 'scalar'")

    def read_vq(self, m: int, n: int, bias: torch.Tensor | None) -> VQLayer:
        e = self.entry
        v, n_pq = self.int_(e, "vector_len"), self.int_(e, "n_pq")
        if v % n_pq:
            raise self.fail("vector_len", f"{v} is not divisible by n_pq={n_pq}")
        d, n_vectors = v // n_pq, -(-m // v)
        perm = self.take("perm", (n,), (torch.int16, torch.int32)).to(torch.int64)
        if not torch.equal(perm.sort().values, torch.arange(n)):
            raise self.fail("perm", f"is not a permutation of 0..{n - 1}")
        specs = e.get("groups")
        if not isinstance(specs, list) or not specs:
            raise self.fail("groups", "manifest needs a non-empty list of groups")
        groups: list[VQGroup] = []
        for i, spec in enumerate(specs):
            if not isinstance(spec, dict):
                raise self.fail(f"groups[{i}]", "must be an object")
            bits, start, stop = self.int_(spec, "bits"), self.int_(spec, "start", 0), self.int_(spec, "stop")
            expected_start = groups[-1].stop if groups else 0
            if start != expected_start or stop <= start:
                raise self.fail(
                    f"groups[{i}]",
                    f"columns [{start}, {stop}) do not continue the previous group at column {expected_start}",
                )
            if not 1 <= bits * d <= 32:
                raise self.fail(f"g{i}.indices", f"{bits} bits x d={d} is outside [1, 32] bits per code")
            cb = self.take(f"g{i}.codebooks", (n_pq, 2 ** (bits * d), d), (torch.float16,))
            count = (stop - start) * n_vectors * n_pq
            idx = self.codes(f"g{i}.indices", count, bits * d).reshape(stop - start, n_vectors, n_pq)
            groups.append(VQGroup(bits, start, stop, cb, idx))
        if groups[-1].stop != n:
            raise self.fail("groups", f"cover columns [0, {groups[-1].stop}), expected [0, {n})")
        return VQLayer(m, n, v, n_pq, perm, groups, bias)
