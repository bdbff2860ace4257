"""OpenAI-compatible generation: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

The API process stays torch-free: it resolves the model to one of the key's succeeded jobs and
forwards to the generation server (``RSAVQ_GENERATION_URL``, ``worker/generation/server.py``),
then shapes its answer as OpenAI's objects. Streams are server-sent events ending with
``data: [DONE]``. Errors use the service's one error body, which has OpenAI's ``error.message`` /
``error.type`` / ``error.code`` / ``error.param`` fields.

Every completion is bounded (``generation_limits``): new tokens, time, one tenant's concurrent
completions, and it stops when its client goes away, streamed or not.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.api.completions import generate
from service.api.deps import Context, DbSession, get_context, tenant_of
from service.api.generation_limits import bounded_tokens
from service.api.schemas.openai import ChatCompletionRequest, CompletionRequest
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
    assert isinstance(client, httpx.AsyncClient)
    return client


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
        client = generation_client(ctx)
        return await generate(request, ctx, client, model, chat, artifact, payloads, stream, include_usage, release)
    except BaseException:
        release()
        raise


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
