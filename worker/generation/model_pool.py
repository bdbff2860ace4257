"""The generation server's model pool: loaded quantized models by artifact sha256, least recently
used evicted first to stay under a memory cap."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rsavq_core.atomic import replacing_folder
from rsavq_core.errors import ConfigError, InsufficientMemoryError
from rsavq_core.runtime import load_quantized_model
from service.artifacts import ArtifactStore, extract

log = logging.getLogger("rsavq.generation")
MAX_TOKENIZERS = 32  # tokenizer-only entries kept (a few MB each): a many-job server must not grow without end


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    nbytes: int
    context: int | None  # the model's maximum positions, when its config says


def _model_bytes(model: torch.nn.Module) -> int:
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}  # tied tensors once
    return sum(t.numel() * t.element_size() for t in tensors.values())


class ModelPool:
    """Loaded models by artifact sha256, least recently used evicted first to stay under a cap."""

    def __init__(self, store: ArtifactStore, cache_dir: Path, device: torch.device, cap_bytes: float) -> None:
        self.store, self.cache_dir, self.device, self.cap = store, cache_dir, device, cap_bytes
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.models: OrderedDict[str, Loaded] = OrderedDict()
        # sha256 -> (tokenizer, context) of artifacts only tokenized (/tokenize), no model; LRU, bounded
        self.tokenizers: OrderedDict[str, tuple[Any, int | None]] = OrderedDict()
        self.lock = threading.Lock()

    def tokenizer(self, relative: str, sha256: str) -> tuple[Any, int | None]:
        """(tokenizer, the model's context or None) of an artifact, without loading its model."""
        with self.lock:
            if sha256 in self.models:
                return self.models[sha256].tokenizer, self.models[sha256].context
            if sha256 not in self.tokenizers:
                from transformers import AutoConfig, AutoTokenizer

                checkpoint = self._checkpoint(relative, sha256)
                if (
                    not (checkpoint / "tokenizer_config.json").is_file()
                    and not (checkpoint / "tokenizer.json").is_file()
                ):
                    raise ConfigError("this checkpoint has no tokenizer")
                context = getattr(AutoConfig.from_pretrained(str(checkpoint)), "max_position_embeddings", None)
                self.tokenizers[sha256] = (AutoTokenizer.from_pretrained(str(checkpoint)), context)
                while len(self.tokenizers) > MAX_TOKENIZERS:
                    self.tokenizers.popitem(last=False)
            self.tokenizers.move_to_end(sha256)
            return self.tokenizers[sha256]

    def get(self, relative: str, sha256: str) -> Loaded:
        with self.lock:
            if sha256 in self.models:
                self.models.move_to_end(sha256)
                return self.models[sha256]
            loaded = self._load(relative, sha256)
            if loaded.nbytes > self.cap:
                raise InsufficientMemoryError(
                    f"the model needs {loaded.nbytes / 2**30:.2f} GiB, over the "
                    f"generation server's cap of {self.cap / 2**30:.2f} GiB"
                )
            while self.models and sum(m.nbytes for m in self.models.values()) + loaded.nbytes > self.cap:
                evicted, _ = self.models.popitem(last=False)
                log.info("evicted %s to stay under %.2f GiB", evicted[:12], self.cap / 2**30)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.models[sha256] = loaded
            return loaded

    def _checkpoint(self, relative: str, sha256: str) -> Path:
        """The artifact's checkpoint folder, extracted once per sha256."""
        folder = self.cache_dir / sha256
        if not folder.is_dir():
            # Verified before anything is unpacked or loaded: the request names the digest.
            source = self.store.verified_path(relative, sha256)
            with replacing_folder(folder) as tmp:  # a crash never leaves a half-extracted model behind
                extract(source, tmp)
        return next(p.parent for p in folder.rglob("rsavq.safetensors"))

    def _load(self, relative: str, sha256: str) -> Loaded:
        checkpoint = self._checkpoint(relative, sha256)
        model, tokenizer, _ = load_quantized_model(checkpoint, dtype=self.dtype, device=self.device)
        if tokenizer is None:
            raise ConfigError("this checkpoint has no tokenizer, so it cannot generate text")
        context = getattr(model.config, "max_position_embeddings", None)
        nbytes = _model_bytes(model)
        log.info("loaded %s (%.2f GiB) on %s", sha256[:12], nbytes / 2**30, self.device)
        return Loaded(model, tokenizer, nbytes, context)
