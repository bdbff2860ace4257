"""The generation server: a GPU process holding quantized models, which the API forwards to.

``rsavq generation-server --port 8001`` runs ``python -m worker.generation.server`` with its
settings (``RSAVQ_GENERATION_HOST`` / ``_PORT`` / ``_DEVICE`` / ``_MEMORY_GB``); ``rsavq serve``
starts one. Internal API, not for clients (the public, OpenAI-shaped one is
``service/api/routes/generation.py``):

* ``POST /generate`` {artifact, sha256, prompt | prompt_ids | messages, params, stream}: the
  artifact is a path relative to the shared artifact store, loaded only if its bytes have that
  sha256 (else 409, as is a path outside the store); the answer is JSON
  {text, finish_reason, prompt_tokens, completion_tokens}, or with ``stream`` server-sent events
  ``{"text": delta}`` ... then that JSON as the last event. With ``params.logprobs`` (the number
  of alternatives per token) or ``params.echo`` it also has ``logprobs`` {tokens, token_logprobs,
  top_logprobs, text_offset} and ``echo`` (the prompt's text, which then leads ``text_offset``);
  ``max_tokens`` 0 scores the prompt without generating.
* ``GET /health``, ``GET /loaded``.

Models are loaded from the published tar (extracted once per sha256 into a cache folder) and
kept in an LRU under a memory cap (``RSAVQ_GENERATION_MEMORY_GB``; default 80 % of the GPU, or
half the RAM on CPU). One generation runs at a time: one device, and the sampling seed is the
process's global RNG.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

import psutil
import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from rsavq_core.errors import ConfigError, RSAVQError
from rsavq_core.runtime.generation import Completion
from service import errors
from service.artifacts import ArtifactStore
from service.settings import Settings, get_settings
from service.shared_secret import bearer_matches
from worker.generation.model_pool import Loaded, ModelPool
from worker.generation.requests import (
    GenerateRequest,
    TokenizeRequest,
    completions,
    prompt_ids,
    result_body,
    sampling,
)

log = logging.getLogger("rsavq.generation")
_END = object()  # the end of one generation's event queue


def _device_and_cap(settings: Settings, device: str | None, memory_gb: float | None) -> tuple[torch.device, float]:
    """The device models go on, and the bytes of models the pool may hold there."""
    dev = torch.device(device or settings.generation_device or ("cuda" if torch.cuda.is_available() else "cpu"))
    memory_gb = memory_gb if memory_gb is not None else settings.generation_memory_gb
    if memory_gb is not None:
        return dev, memory_gb * 2**30
    if dev.type == "cuda":
        return dev, 0.8 * torch.cuda.get_device_properties(dev).total_memory
    return dev, 0.5 * psutil.virtual_memory().total


class Generations:
    """Generations run one at a time, each in a thread of its own that feeds a queue of events.

    The thread, not the HTTP response, owns the device lock: a client that goes away can never
    leave it held (it sets ``cancel`` instead, which stops generation at the next token).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def start(self, loaded: Loaded, req: GenerateRequest) -> tuple[queue.Queue[Any], threading.Event]:
        """Validate (bad input raises here, before any answer is sent), then generate in a thread."""
        ids = prompt_ids(loaded, req)
        params = sampling(loaded, req, len(ids))
        events: queue.Queue[Any] = queue.Queue()
        cancel = threading.Event()

        def work() -> None:
            try:
                with self.lock:
                    for item in completions(loaded, req, ids, params, cancel):
                        events.put(item)
            except Exception as exc:  # handed to the request, which reports it
                events.put(exc)
            finally:
                events.put(_END)

        threading.Thread(target=work, name="generation", daemon=True).start()
        return events, cancel

    @staticmethod
    def take(events: queue.Queue[Any]) -> Any:
        item = events.get()
        if isinstance(item, Exception):
            raise item
        return item


def _generation_routes(pool: ModelPool, generations: Generations) -> APIRouter:
    router = APIRouter()
    take = generations.take

    @router.post("/generate")
    async def generate(req: GenerateRequest) -> Any:
        loaded = await run_in_threadpool(pool.get, req.artifact, req.sha256)
        events, cancel = generations.start(loaded, req)
        first = await run_in_threadpool(take, events)  # a failure before the first token is a plain error
        if not req.stream:
            last = first
            while (item := await run_in_threadpool(take, events)) is not _END:
                last = item
            return result_body(last)

        async def sse() -> AsyncIterator[ServerSentEvent]:
            item = first
            try:
                while item is not _END:
                    body = result_body(item) if isinstance(item, Completion) else {"text": item}
                    yield ServerSentEvent(json.dumps(body))
                    item = await run_in_threadpool(take, events)
            except Exception as exc:  # the 200 is gone: the error becomes the last event
                status = errors.status_of(exc) if isinstance(exc, RSAVQError) else 500
                yield ServerSentEvent(json.dumps(errors.error_body(status, str(exc), type(exc).__name__)))
            finally:  # also on a disconnect (cancellation): stop generating for nobody
                cancel.set()

        return EventSourceResponse(sse(), sep="\n")

    return router


def _tokenizer_routes(pool: ModelPool) -> APIRouter:
    router = APIRouter()

    @router.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        tokenizer, context = await run_in_threadpool(pool.tokenizer, req.artifact, req.sha256)
        if req.prompt is None:
            raise ConfigError("give a prompt to tokenize")
        ids = [int(i) for i in tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]]
        return {"tokens": ids, "count": len(ids), "max_model_len": context}

    @router.post("/detokenize")
    async def detokenize(req: TokenizeRequest) -> dict[str, Any]:
        tokenizer, _ = await run_in_threadpool(pool.tokenizer, req.artifact, req.sha256)
        if req.tokens is None:
            raise ConfigError("give the token ids to detokenize")
        if any(not 0 <= i < len(tokenizer) for i in req.tokens):
            raise ConfigError(f"token ids must lie in [0, {len(tokenizer)})")
        return {"prompt": tokenizer.decode(req.tokens)}

    return router


def create_app(settings: Settings | None = None, device: str | None = None, memory_gb: float | None = None) -> FastAPI:
    settings = settings or get_settings()
    if settings.generation_token is None:
        raise ConfigError("the generation server needs RSAVQ_GENERATION_TOKEN, the secret the API shows it")
    secret = settings.generation_token.get_secret_value()
    dev, cap = _device_and_cap(settings, device, memory_gb)
    pool = ModelPool(ArtifactStore(settings.artifact_dir), settings.data_dir / "generation-cache", dev, cap)
    app = FastAPI(title="rsavq generation server (internal)")
    app.state.pool = pool
    errors.install(app)

    @app.middleware("http")
    async def require_the_secret(request: Request, call_next: Any) -> Any:
        """Everything but /health needs the shared secret: this server loads artifacts on request."""
        if request.url.path != "/health" and not bearer_matches(request.headers.get("authorization"), secret):
            body = errors.error_body(
                401, "the generation server takes requests from the API only", "AuthenticationError"
            )
            return JSONResponse(body, status_code=401)
        return await call_next(request)

    app.include_router(_generation_routes(pool, Generations()))
    app.include_router(_tokenizer_routes(pool))

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
