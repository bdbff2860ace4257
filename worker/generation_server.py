"""The generation server: a GPU process holding quantized models, which the API forwards to.

``rsavq generation-server --port 8001`` runs ``python -m worker.generation_server`` with its
settings (``RSAVQ_GENERATION_HOST`` / ``_PORT`` / ``_DEVICE`` / ``_MEMORY_GB``); ``rsavq serve``
starts one. Internal API, not for clients (the public, OpenAI-shaped one is
``service/api/routes_generation.py``):

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

import dataclasses
import json
import logging
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import psutil
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from rsavq_core.errors import ConfigError, RSAVQError
from rsavq_core.runtime.generation import Completion, SamplingParams, stream_completion
from rsavq_core.runtime.scoring import MAX_TOP_LOGPROBS, score_completion
from service import errors
from service.artifacts import ArtifactStore
from service.settings import Settings, get_settings
from service.shared_secret import bearer_matches
from worker.model_pool import Loaded, ModelPool

log = logging.getLogger("rsavq.generation")
DEFAULT_MAX_TOKENS = 256  # when neither the request nor the model's config bounds a chat answer
_END = object()  # the end of one generation's event queue


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_tokens: int | None = Field(16, ge=0, description="None: up to the model's context; 0: score the prompt only")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list, max_length=4)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.manual_seed takes
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="alternatives per scored token")
    echo: bool = False  # return (and score) the prompt before the completion


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


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    artifact: str
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")
    prompt: str | None = None  # text to tokenize
    tokens: list[int] | None = None  # ids to detokenize
    add_special_tokens: bool = True


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
    budget = 1 if budget is None else budget
    if loaded.context is not None and len(ids) + budget > loaded.context:
        raise ConfigError(
            f"the prompt ({len(ids)} tokens) plus max_tokens ({budget}) exceeds "
            f"the model's context of {loaded.context} tokens"
        )
    return ids


def _max_tokens(loaded: Loaded, prompt_len: int, asked: int | None) -> int:
    if asked is not None:
        return asked
    return loaded.context - prompt_len if loaded.context is not None else DEFAULT_MAX_TOKENS


def _result(done: Completion) -> dict[str, Any]:
    out = {
        "text": done.text,
        "finish_reason": done.finish_reason,
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
    }
    if done.scores is not None:
        scores = dataclasses.asdict(done.scores)
        out["echo"] = scores.pop("echo")
        out["logprobs"] = scores
    return out


def _sampling(loaded: Loaded, req: GenerateRequest, prompt_len: int) -> SamplingParams | None:
    """The request's sampling, validated; None when there is nothing to generate (max_tokens 0)."""
    p = req.params
    if p.max_tokens == 0:
        return None
    return SamplingParams(
        max_tokens=_max_tokens(loaded, prompt_len, p.max_tokens),
        temperature=p.temperature,
        top_p=p.top_p,
        stop=tuple(p.stop),
        seed=p.seed,
    )


def _completions(
    loaded: Loaded, req: GenerateRequest, ids: list[int], params: SamplingParams | None, cancel: threading.Event
) -> Iterator[Any]:
    """The generation's events (text deltas, then the Completion, scored when asked)."""
    p = req.params
    if params is None:  # nothing to generate: the prompt alone is scored and returned (echo)
        items: Iterator[str | Completion] = iter([Completion(prompt_tokens=len(ids))])
    else:
        items = stream_completion(loaded.model, loaded.tokenizer, ids, params, cancel=cancel)
    for item in items:
        if isinstance(item, Completion) and (p.logprobs is not None or p.echo):
            item.scores = score_completion(
                loaded.model, loaded.tokenizer, ids, item.token_ids, item.text, top=p.logprobs or 0, echo=p.echo
            )
        yield item


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
        params = _sampling(loaded, req, len(ids))
        events: queue.Queue[Any] = queue.Queue()
        cancel = threading.Event()

        def work() -> None:
            try:
                with generating:
                    for item in _completions(loaded, req, ids, params, cancel):
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

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        tokenizer, context = await run_in_threadpool(pool.tokenizer, req.artifact, req.sha256)
        if req.prompt is None:
            raise ConfigError("give a prompt to tokenize")
        ids = [int(i) for i in tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]]
        return {"tokens": ids, "count": len(ids), "max_model_len": context}

    @app.post("/detokenize")
    async def detokenize(req: TokenizeRequest) -> dict[str, Any]:
        tokenizer, _ = await run_in_threadpool(pool.tokenizer, req.artifact, req.sha256)
        if req.tokens is None:
            raise ConfigError("give the token ids to detokenize")
        if any(not 0 <= i < len(tokenizer) for i in req.tokens):
            raise ConfigError(f"token ids must lie in [0, {len(tokenizer)})")
        return {"prompt": tokenizer.decode(req.tokens)}

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
