"""Model ids -> local checkpoints -> loaded transformers models, and a checkpoint's fingerprint.

Resolution is offline, in the order ``rsavq_core.models.files`` gives (a local folder, a built-in
alias converted once here, the Hugging Face cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from rsavq_core.atomic import replacing_folder, write_json
from rsavq_core.errors import ModelResolutionError
from rsavq_core.models.files import (
    ALIASES,
    HF_ID,
    alias_folder,
    alias_gguf,
    cache_root,
    hf_cache_folder,
    is_converted,
    local_folder,
)

log = logging.getLogger(__name__)


def resolve_model(model_id: str) -> Path:
    """A local checkpoint folder for ``model_id``, or ``ModelResolutionError`` saying what was tried."""
    if not isinstance(model_id, str) or not model_id.strip():
        raise ModelResolutionError("empty model id")
    folder, tried_local = local_folder(model_id)
    if folder is not None:
        return folder
    tried = [tried_local]
    if model_id in ALIASES:
        return _materialize_alias(model_id)
    tried.append(f"built-in aliases ({', '.join(sorted(ALIASES))})")
    if HF_ID.match(model_id):
        snapshot = hf_cache_folder(model_id)
        if snapshot is not None:
            return snapshot
        tried.append(f"Hugging Face cache for {model_id!r} (not cached; no network access is attempted)")
    else:
        tried.append("Hugging Face cache (not an 'owner/name' id)")
    raise ModelResolutionError(f"cannot resolve model {model_id!r}; tried: " + "; ".join(tried))


def _materialize_alias(alias: str) -> Path:
    """Convert the alias's GGUF to a plain safetensors folder once; later calls reuse it."""
    gguf = alias_gguf(alias)
    out = alias_folder(alias)
    if is_converted(out):
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
    with replacing_folder(out) as tmp:  # a crash never leaves a half-written folder under the final name
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def load_model(model_id: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object, Path]:
    """(model in eval mode, tokenizer, resolved folder) for any decoder-only transformers model."""
    from transformers import AutoModelForCausalLM

    folder = resolve_model(model_id)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    tokenizer = load_tokenizer(folder)
    model.eval()
    return model, tokenizer, folder


def load_tokenizer(folder: Path) -> object:
    """The tokenizer of a resolved checkpoint folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


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
    write_json(memo, {"key": key, "sha256": sha.hexdigest(), "path": str(file)})
    return sha.hexdigest()
