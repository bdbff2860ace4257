"""The finished layers of a running quantization, kept on disk so a killed run resumes where it stopped.

One folder per run: ``run.json`` (the config and model fingerprint it belongs to) and one
``<layer>.safetensors`` per finished layer, in the packed format's tensor layout, with the
manifest entry and the layer's report in its metadata. Files are written to a temporary name and
renamed, so a layer file is either complete or absent. Layers are quantized independently from
cached statistics with a fixed per-layer seed, so a resumed run produces the same layers as an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from rsavq_core.atomic import replacing, write_json
from rsavq_core.checkpoint.canonical import save_canonical
from rsavq_core.checkpoint.manifest import layer_tensors, manifest_entry, read_layer
from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.errors import ArtifactError, ConfigError
from rsavq_core.formats.base import LayerReader, QuantizedLayer

log = logging.getLogger(__name__)
RUN_FILE = "run.json"


class FinishedLayers:
    """Finished layers of one (model, config) run in ``folder``."""

    def __init__(self, folder: str | Path, cfg: QuantConfig, fingerprint: str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        identity = {"config": cfg.to_dict(), "fingerprint": fingerprint}
        run_file = self.folder / RUN_FILE
        if run_file.exists():
            stored = json.loads(run_file.read_text())
            if isinstance(stored.get("config"), dict):  # written before calib_data existed: it was None
                stored["config"] = {"calib_data": None, **stored["config"]}
            if stored != identity:
                # A checkpoint of another config or another model must never be mixed in.
                raise ConfigError(
                    f"{self.folder} holds the checkpoint of a different run "
                    f"(model {stored.get('fingerprint')}); use a new folder"
                )
        else:
            write_json(run_file, identity, sort_keys=True)

    def _file(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    def layer_file(self, name: str) -> Path:
        """Where layer ``name`` is (or will be) checkpointed."""
        return self._file(name)

    def finished(self) -> list[str]:
        """Names of the layers already checkpointed."""
        return sorted(p.name.removesuffix(".safetensors") for p in self.folder.glob("*.safetensors"))

    def load(self, name: str) -> tuple[QuantizedLayer, dict[str, Any]] | None:
        """The checkpointed (layer, report) of ``name``, or None if it has not finished."""
        file = self._file(name)
        if not file.exists():
            return None
        try:
            with safe_open(str(file), framework="pt") as fh:
                metadata = dict(fh.metadata() or {})
                tensors = {key: fh.get_tensor(key) for key in fh.keys()}
            entry, report = json.loads(metadata["entry"]), json.loads(metadata["report"])
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as exc:
            # Only a crash between write and rename could leave this; redo the layer.
            log.warning("discarding unreadable layer checkpoint %s: %s", file, exc)
            file.unlink(missing_ok=True)
            return None
        try:
            return read_layer(LayerReader(file, name, entry, tensors)), report
        except ArtifactError as exc:
            log.warning("discarding inconsistent layer checkpoint %s: %s", file, exc)
            file.unlink(missing_ok=True)
            return None

    def _norms_file(self, block: int) -> Path:
        return self.folder / "norms" / f"block_{block:04d}.safetensors"  # not a layer: not in finished()

    def save_norms(self, block: int, norms: dict[str, torch.Tensor]) -> None:
        """Checkpoint a block's fine-tuned normalisation weights (relative names) atomically; saved
        before the block's layers, so a block whose layers are all on disk has its norms there too.
        Empty: the block's fine-tuning kept no norms, and an older file must not be loaded."""
        file = self._norms_file(block)
        if not norms:
            file.unlink(missing_ok=True)
            return
        with replacing(file) as tmp:
            save_canonical(norms, tmp, {})

    def load_norms(self, block: int) -> dict[str, torch.Tensor]:
        """The block's checkpointed normalisation weights (relative name -> tensor), or none."""
        file = self._norms_file(block)
        if not file.exists():
            return {}
        with safe_open(str(file), framework="pt") as fh:
            return {key: fh.get_tensor(key) for key in fh.keys()}

    def save(self, name: str, layer: QuantizedLayer, report: dict[str, Any]) -> None:
        """Checkpoint one finished layer atomically."""
        metadata = {"entry": json.dumps(manifest_entry(layer)), "report": json.dumps(report, default=float)}
        with replacing(self._file(name)) as tmp:
            save_canonical(layer_tensors(name, layer), tmp, metadata)


class CheckpointedLayers(Mapping[str, QuantizedLayer]):
    """Finished layers that stay on disk (a streamed run keeps no packed layer in memory): each is
    read when asked for, and the packed checkpoint copies their tensors straight from the files."""

    def __init__(
        self,
        store: FinishedLayers,
        names: list[str],
        keep_alive: object = None,
        in_memory: Mapping[str, QuantizedLayer] | None = None,
    ) -> None:
        self.store, self.finished = store, LazyFinished(store, names)
        self._keep_alive = keep_alive  # e.g. the TemporaryDirectory the files live in
        self.in_memory = dict(in_memory or {})  # layers that never went to disk (the embeddings)

    def including(self, layers: Mapping[str, QuantizedLayer]) -> CheckpointedLayers:
        """These layers and ``layers`` (held in memory) as one mapping."""
        names = list(self.finished)
        return CheckpointedLayers(self.store, names, self._keep_alive, {**self.in_memory, **layers})

    def __getitem__(self, name: str) -> QuantizedLayer:
        if name in self.in_memory:
            return self.in_memory[name]
        try:
            return self.finished[name][0]
        except KeyError:
            if name in self.finished:  # listed, yet its file is gone or unreadable
                raise ArtifactError(f"the finished layer {name} is no longer readable in {self.store.folder}") from None
            raise

    def __iter__(self) -> Iterator[str]:
        yield from self.finished
        yield from (name for name in self.in_memory if name not in self.finished)

    def __len__(self) -> int:
        return len(self.finished) + sum(name not in self.finished for name in self.in_memory)

    def __contains__(self, name: object) -> bool:
        return name in self.in_memory or name in self.finished

    def on_disk(self, name: str) -> bool:
        """Whether layer ``name``'s packed tensors are in a file (``file``, ``entry``)."""
        return name in self.finished and name not in self.in_memory

    def file(self, name: str) -> Path:
        """The safetensors file holding layer ``name``'s packed tensors (as the checkpoint names them)."""
        return self.store.layer_file(name)

    def entry(self, name: str) -> dict[str, Any]:
        """Layer ``name``'s manifest entry, from its file's metadata (no tensor is read)."""
        with safe_open(str(self.file(name)), framework="pt") as fh:
            entry: dict[str, Any] = json.loads((fh.metadata() or {})["entry"])
        return entry


class LazyFinished(Mapping[str, tuple[QuantizedLayer, dict[str, Any]]]):
    """What an earlier run finished, read from disk when asked for (a streamed run's resume)."""

    def __init__(self, store: FinishedLayers, names: list[str]) -> None:
        self.store, self._names = store, list(names)
        self._known = set(self._names)

    def __getitem__(self, name: str) -> tuple[QuantizedLayer, dict[str, Any]]:
        loaded = self.store.load(name) if name in self._known else None
        if loaded is None:
            raise KeyError(name)
        return loaded

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:  # by name: Mapping's default would read the file
        return name in self._known
