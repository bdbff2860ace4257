"""OpenAI-compatible generation: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

The API process stays torch-free: it resolves the model to one of the key's succeeded jobs and
forwards to the generation server (``RSAVQ_GENERATION_URL``, ``worker/generation_server.py``),
then shapes its answer as OpenAI's objects. Streams are server-sent events ending with
``data: [DONE]``. Errors use the service's one error body, which has OpenAI's ``error.message`` /
``error.type`` / ``error.code`` / ``error.param`` fields.

Every completion is bounded (``generation_limits``): new tokens, time, one tenant's concurrent
completions, and it stops when its client goes away, streamed or not.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from httpx_sse import aconnect_sse
from sqlalchemy import select
from sqlalchemy.orm import Session
from sse_starlette import EventSourceResponse, ServerSentEvent

from service import errors
from service.api.deps import Context, DbSession, get_context, tenant_of
from service.api.generation_limits import bounded_tokens, timed_out, unless_gone
from service.api.schemas_openai import ChatCompletionRequest, CompletionRequest
from service.db import Artifact, Job
from service.errors import ConflictError, NotFoundError, UnavailableError
from service.jobs import SUCCEEDED

router = APIRouter(prefix="/v1", tags=["generation"])
Tenant = Annotated[str, Depends(tenant_of)]
Ctx = Annotated[Context, Depends(get_context)]


def resolve_model_job(session: Session, tenant: str, model: str) -> tuple[Job, Artifact]:
    """The job a ``model`` field names (its id, else the latest succeeded job of that name)."""
    job = session.get(Job, model)
    if job is None or job.tenant != tenant:
        job = session.scalars(
            select(Job)
            .where(Job.tenant == tenant, Job.name == model)
            .order_by((Job.status == SUCCEEDED).desc(), Job.finished_at.desc())
            .limit(1)
        ).first()
    if job is None:
        raise NotFoundError(f"no model {model!r}: use a succeeded job's id or name (GET /v1/models lists them)")
    if job.status != SUCCEEDED:
        raise ConflictError(f"job {job.id} is {job.status}; only a succeeded job's model can generate")
    artifact = session.get(Artifact, job.id)
    if artifact is None:
        raise ConflictError(f"job {job.id} has no artifact")
    return job, artifact


def generation_client(ctx: Context) -> httpx.AsyncClient:
    if not ctx.settings.generation_url:
        raise UnavailableError("no generation server is configured (RSAVQ_GENERATION_URL)")
    client = ctx.generation_client
    if client is None:
        # No read timeout: a long generation is not an error; connecting is bounded.
        token = ctx.settings.generation_token
        headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token is not None else {}
        client = httpx.AsyncClient(
            base_url=ctx.settings.generation_url, timeout=httpx.Timeout(None, connect=10.0), headers=headers
        )
        ctx.generation_client = client
    return client


def upstream_error(status: int, raw: bytes) -> JSONResponse:
    try:
        body = json.loads(raw)
        assert isinstance(body, dict) and "error" in body
    except (ValueError, AssertionError):
        body = errors.error_body(502, f"generation server answered {status}: {raw[:200]!r}", "UpstreamError")
        status = 502
    return JSONResponse(body, status_code=status)


async def _events(client: httpx.AsyncClient, payload: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
    """The generation server's events for one prompt: {"text": delta}..., then the final result."""
    async with aconnect_sse(client, "POST", "/generate", json={**payload, "stream": True}) as source:
        if source.response.status_code != 200:
            raise _Upstream(source.response.status_code, await source.response.aread())
        async for event in source.aiter_sse():
            yield json.loads(event.data)


class _Upstream(Exception):
    def __init__(self, status: int, raw: bytes) -> None:
        super().__init__(status)
        self.status, self.raw = status, raw


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _serve(
    request: Request,
    ctx: Context,
    session: Session,
    tenant: str,
    model: str,
    chat: bool,
    payloads: list[dict[str, Any]],
    stream: bool,
    include_usage: bool,
) -> Any:
    _, artifact = resolve_model_job(session, tenant, model)
    session.rollback()  # hold no pooled connection while generating
    release = ctx.generation_slots.hold(tenant, ctx.settings.tenant_max_generations)
    try:
        return await _generate(request, ctx, model, chat, artifact, payloads, stream, include_usage, release)
    except BaseException:
        release()
        raise


async def _generate(
    request: Request,
    ctx: Context,
    model: str,
    chat: bool,
    artifact: Artifact,
    payloads: list[dict[str, Any]],
    stream: bool,
    include_usage: bool,
    release: Callable[[], None],
) -> Any:
    """One held slot's completion; ``release`` runs when it ends (the stream's end, for a stream)."""
    deadline = time.monotonic() + ctx.settings.generation_deadline_s
    client = generation_client(ctx)
    base = {"artifact": artifact.path, "sha256": artifact.sha256}
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created, kind = int(time.time()), "chat.completion" if chat else "text_completion"
    payloads = [{**base, **p} for p in payloads]
    try:
        first = _events(client, payloads[0])
        head = await anext(first)  # errors (bad prompt, model too big) surface before the 200
    except _Upstream as exc:
        release()
        return upstream_error(exc.status, exc.raw)
    except httpx.TransportError as exc:
        raise UnavailableError(f"generation server at {ctx.settings.generation_url} unreachable: {exc}") from exc

    async def per_prompt() -> AsyncIterator[tuple[int, dict[str, Any]]]:
        yield 0, head
        async for event in first:
            yield 0, event
        for index, payload in enumerate(payloads[1:], start=1):
            async for event in _events(client, payload):
                yield index, event

    def choice(
        index: int, text: str | None, finish: str | None, delta: bool, event: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        if not chat:  # with echo / logprobs the generation server's event carries both
            scored = event or {}
            text = scored.get("echo", "") + (text or "")
            return {"index": index, "text": text, "logprobs": scored.get("logprobs"), "finish_reason": finish}
        key = "delta" if delta else "message"
        message = {"role": "assistant", "content": text} if (text is not None or not delta) else {}
        return {"index": index, key: message, "logprobs": None, "finish_reason": finish}

    async def collect() -> Any:
        choices, prompt_tokens, completion_tokens = [], 0, 0
        try:
            async for index, event in per_prompt():
                if "error" in event:  # failed after it started
                    return JSONResponse(event, status_code=int(event["error"].get("status") or 500))
                if "finish_reason" in event:
                    choices.append(choice(index, event["text"], event["finish_reason"], delta=False, event=event))
                    prompt_tokens += event["prompt_tokens"]
                    completion_tokens += event["completion_tokens"]
        except _Upstream as exc:  # a later prompt of a batch was refused
            return upstream_error(exc.status, exc.raw)
        finally:  # also when cancelled (client gone, deadline): closing upstream cancels the generation
            await first.aclose()
        return {
            "id": ident,
            "object": kind,
            "created": created,
            "model": model,
            "choices": choices,
            "usage": _usage(prompt_tokens, completion_tokens),
        }

    if not stream:
        try:
            answer = await unless_gone(request, collect(), deadline)
        except TimeoutError:
            return JSONResponse(timed_out(ctx), status_code=504)
        finally:
            release()
        return Response(status_code=499) if answer is None else answer  # 499: nobody is listening

    chunk_kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> ServerSentEvent:
        body: dict[str, Any] = {
            "id": ident,
            "object": chunk_kind,
            "created": created,
            "model": model,
            "choices": choices,
        }
        if include_usage:
            body["usage"] = usage
        return ServerSentEvent(json.dumps(body))

    async def sse() -> AsyncIterator[ServerSentEvent]:
        totals = [0, 0]
        try:
            async for index, event in per_prompt():
                if time.monotonic() > deadline:  # the deadline: the error is the last event
                    yield ServerSentEvent(json.dumps(timed_out(ctx)))
                    return
                if "error" in event:  # the generation server failed mid-stream: its error is the last event
                    yield ServerSentEvent(json.dumps(event))
                    return
                if "finish_reason" in event:
                    totals[0] += event["prompt_tokens"]
                    totals[1] += event["completion_tokens"]
                    yield chunk([choice(index, None if chat else "", event["finish_reason"], delta=True)])
                elif event.get("text"):
                    yield chunk([choice(index, event["text"], None, delta=True)])
        except (_Upstream, httpx.TransportError) as exc:  # the 200 is gone: report in the stream
            message = f"generation failed: {exc}"
            yield ServerSentEvent(json.dumps(errors.error_body(502, message, "UpstreamError")))
            return
        finally:  # also when the client hangs up: close the upstream stream, which cancels the generation
            await first.aclose()
            release()
        if include_usage:
            yield chunk([], _usage(*totals))
        yield ServerSentEvent("[DONE]")

    return EventSourceResponse(sse(), sep="\n", headers={"Cache-Control": "no-cache"})


@router.post("/completions", summary="Complete a prompt with a quantized model (OpenAI-compatible)")
async def completions(body: CompletionRequest, request: Request, tenant: Tenant, ctx: Ctx, session: DbSession) -> Any:
    params = body.params(bounded_tokens(ctx, body.max_tokens))
    payloads = [{**p, "params": params} for p in body.prompts()]
    return await _serve(request, ctx, session, tenant, body.model, False, payloads, body.stream, body.include_usage())


@router.post("/chat/completions", summary="Chat with a quantized model (OpenAI-compatible)")
async def chat_completions(
    body: ChatCompletionRequest, request: Request, tenant: Tenant, ctx: Ctx, session: DbSession
) -> Any:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    params = body.params(bounded_tokens(ctx, body.max_completion_tokens or body.max_tokens))
    return await _serve(request, ctx, session, tenant, body.model, True, [{"messages": messages, "params": params}],
                        body.stream, body.include_usage())  # fmt: skip


@router.get("/models", summary="The models this key may generate with (its succeeded jobs)")
def list_models(tenant: Tenant, session: DbSession) -> dict[str, Any]:
    rows = (
        session.execute(
            select(Job)
            .join(Artifact, Artifact.job_id == Job.id)
            .where(Job.tenant == tenant, Job.status == SUCCEEDED)
            .order_by(Job.finished_at.desc())
        )
        .scalars()
        .all()
    )
    data = [
        {
            "id": job.id,
            "object": "model",
            "owned_by": tenant,
            # the database keeps naive UTC datetimes
            "created": int((job.finished_at or job.created_at).replace(tzinfo=dt.UTC).timestamp()),
            "name": job.name,
            "source_model": job.model_id,
            "method": job.method,
            "bits": job.bits,
            "effective_bpw": job.effective_bpw,
        }
        for job in rows
    ]
    return {"object": "list", "data": data}
