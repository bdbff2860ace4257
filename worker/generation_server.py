"""The generation server: a GPU process holding quantized models, which the API forwards to.

``rsavq generation-server --port 8001`` runs ``python -m worker.generation_server`` with its
settings (``RSAVQ_GENERATION_HOST`` / ``_PORT`` / ``_DEVICE`` / ``_MEMORY_GB``); ``rsavq serve``
starts one. Internal API, not for clients (the public, OpenAI-shaped one is
``service/api/routes_generation.py``):

* ``POST /generate`` {artifact, sha256, prompt | prompt_ids | messages, params, stream}: the
  artifact is a path relative to the shared artifact store, loaded only if its bytes have that
  sha256 (else 409, as is a path outside the store); the answer is JSON
  {text, finish_reason, prompt_tokens, completion_tokens}, or with ``stream`` server-sent events
  ``{"text": delta}`` ... then that JSON as the last event.
* ``GET /health``, ``GET /loaded``.

Models are loaded from the published tar (extracted once per sha256 into a cache folder) and
kept in an LRU under a memory cap (``RSAVQ_GENERATION_MEMORY_GB``; default 80 % of the GPU, or
half the RAM on CPU). One generation runs at a time: one device, and the sampling seed is the
process's global RNG.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psutil
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from rsavq_core.errors import ConfigError, InsufficientMemoryError, RSAVQError
from rsavq_core.runtime import load_quantized_model
from rsavq_core.runtime.generation import Completion, SamplingParams, stream_completion
from service import errors
from service.artifacts import ArtifactStore, extract
from service.settings import Settings, get_settings
from service.shared_secret import bearer_matches

log = logging.getLogger("rsavq.generation")
DEFAULT_MAX_TOKENS = 256  # when neither the request nor the model's config bounds a chat answer
_END = object()  # the end of one generation's event queue


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_tokens: int | None = Field(16, ge=1, description="None: up to the model's context")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list, max_length=4)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.manual_seed takes


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    artifact: str  # relative to the artifact store
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[Message] | None = None
    params: Params = Field(default_factory=Params)
    stream: bool = False


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
        self.lock = threading.Lock()

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

    def _load(self, relative: str, sha256: str) -> Loaded:
        folder = self.cache_dir / sha256
        if not folder.is_dir():
            # Verified before anything is unpacked or loaded: the request names the digest.
            source = self.store.verified_path(relative, sha256)
            tmp = self.cache_dir / f".{sha256}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            extract(source, tmp)
            os.replace(tmp, folder)  # atomic: a crash never leaves a half-extracted model behind
        checkpoint = next(p.parent for p in folder.rglob("rsavq.safetensors"))
        model, tokenizer, _ = load_quantized_model(checkpoint, dtype=self.dtype, device=self.device)
        if tokenizer is None:
            raise ConfigError("this checkpoint has no tokenizer, so it cannot generate text")
        context = getattr(model.config, "max_position_embeddings", None)
        nbytes = _model_bytes(model)
        log.info("loaded %s (%.2f GiB) on %s", sha256[:12], nbytes / 2**30, self.device)
        return Loaded(model, tokenizer, nbytes, context)


def _prompt_ids(loaded: Loaded, req: GenerateRequest) -> list[int]:
    tok = loaded.tokenizer
    if req.messages is not None:
        messages = [m.model_dump() for m in req.messages]
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:  # a base model without a template: a plain transcript
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            ids = tok(text)["input_ids"]
    elif req.prompt_ids is not None:
        ids = req.prompt_ids
        vocab = len(tok)
        if any(not 0 <= i < vocab for i in ids):
            raise ConfigError(f"prompt token ids must lie in [0, {vocab})")
    elif req.prompt is not None:
        ids = tok(req.prompt)["input_ids"]
    else:
        raise ConfigError("give a prompt, prompt token ids or messages")
    ids = [int(i) for i in ids]
    if not ids:
        raise ConfigError("the prompt is empty")
    budget = req.params.max_tokens
    if loaded.context is not None and len(ids) + (budget or 1) > loaded.context:
        raise ConfigError(
            f"the prompt ({len(ids)} tokens) plus max_tokens ({budget or 1}) exceeds "
            f"the model's context of {loaded.context} tokens"
        )
    return ids


def _max_tokens(loaded: Loaded, prompt_len: int, asked: int | None) -> int:
    if asked is not None:
        return asked
    return loaded.context - prompt_len if loaded.context is not None else DEFAULT_MAX_TOKENS


def _result(done: Completion) -> dict[str, Any]:
    return {
        "text": done.text,
        "finish_reason": done.finish_reason,
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
    }


def create_app(settings: Settings | None = None, device: str | None = None, memory_gb: float | None = None) -> FastAPI:
    settings = settings or get_settings()
    if settings.generation_token is None:
        raise ConfigError("the generation server needs RSAVQ_GENERATION_TOKEN, the secret the API shows it")
    secret = settings.generation_token.get_secret_value()
    device = device or settings.generation_device
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    memory_gb = memory_gb if memory_gb is not None else settings.generation_memory_gb
    if memory_gb is not None:
        cap = memory_gb * 2**30
    elif dev.type == "cuda":
        cap = 0.8 * torch.cuda.get_device_properties(dev).total_memory
    else:
        cap = 0.5 * psutil.virtual_memory().total
    pool = ModelPool(ArtifactStore(settings.artifact_dir), settings.data_dir / "generation-cache", dev, cap)
    generating = threading.Lock()
    app = FastAPI(title="rsavq generation server (internal)")
    app.state.pool = pool
    errors.install(app)

    @app.middleware("http")
    async def require_the_secret(request: Request, call_next: Any) -> Any:
        """Everything but /health needs the shared secret: this server loads artifacts on request."""
        if request.url.path != "/health":
            if not bearer_matches(request.headers.get("authorization"), secret):
                body = errors.error_body(
                    401, "the generation server takes requests from the API only", "AuthenticationError"
                )
                return JSONResponse(body, status_code=401)
        return await call_next(request)

    def start(loaded: Loaded, req: GenerateRequest) -> tuple[queue.Queue[Any], threading.Event]:
        """Validate, then generate in a thread of its own that feeds a queue.

        The thread, not the HTTP response, owns the device lock: a client that goes away can
        never leave it held (it sets ``cancel`` instead, which stops generation at the next token).
        """
        ids = _prompt_ids(loaded, req)  # bad input raises here, before any answer is sent
        p = req.params
        params = SamplingParams(
            max_tokens=_max_tokens(loaded, len(ids), p.max_tokens),
            temperature=p.temperature,
            top_p=p.top_p,
            stop=tuple(p.stop),
            seed=p.seed,
        )
        events: queue.Queue[Any] = queue.Queue()
        cancel = threading.Event()

        def work() -> None:
            try:
                with generating:
                    for item in stream_completion(loaded.model, loaded.tokenizer, ids, params, cancel=cancel):
                        events.put(item)
            except Exception as exc:  # handed to the request, which reports it
                events.put(exc)
            finally:
                events.put(_END)

        threading.Thread(target=work, name="generation", daemon=True).start()
        return events, cancel

    def take(events: queue.Queue[Any]) -> Any:
        item = events.get()
        if isinstance(item, Exception):
            raise item
        return item

    @app.post("/generate")
    async def generate(req: GenerateRequest) -> Any:
        loaded = await run_in_threadpool(pool.get, req.artifact, req.sha256)
        events, cancel = start(loaded, req)
        first = await run_in_threadpool(take, events)  # a failure before the first token is a plain error
        if not req.stream:
            last = first
            while (item := await run_in_threadpool(take, events)) is not _END:
                last = item
            return _result(last)

        async def sse() -> AsyncIterator[ServerSentEvent]:
            item = first
            try:
                while item is not _END:
                    body = _result(item) if isinstance(item, Completion) else {"text": item}
                    yield ServerSentEvent(json.dumps(body))
                    item = await run_in_threadpool(take, events)
            except Exception as exc:  # the 200 is gone: the error becomes the last event
                status = errors.status_of(exc) if isinstance(exc, RSAVQError) else 500
                yield ServerSentEvent(json.dumps(errors.error_body(status, str(exc), type(exc).__name__)))
            finally:  # also on a disconnect (cancellation): stop generating for nobody
                cancel.set()

        return EventSourceResponse(sse(), sep="\n")

    @app.get("/health")
    def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "device": str(dev), "loaded": len(pool.models)})

    @app.get("/loaded")
    def loaded_models() -> dict[str, Any]:
        return {"cap_bytes": pool.cap, "models": [{"sha256": k, "bytes": v.nbytes} for k, v in pool.models.items()]}

    return app


def main() -> None:
    """Serve on the settings' ``generation_host``:``generation_port`` (``rsavq generation-server`` sets them)."""
    import uvicorn

    settings = get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.generation_host,
        port=settings.generation_port,
        timeout_graceful_shutdown=10,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
