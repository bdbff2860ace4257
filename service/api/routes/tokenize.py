"""``POST /tokenize`` and ``/detokenize`` (vLLM's shape, which common clients probe): a job's own
tokenizer, by the ``model`` field as ``/v1/completions`` takes it, through the generation server."""

from __future__ import annotations

from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from service.api.completions import upstream_error
from service.api.deps import Context, DbSession, get_context, tenant_of
from service.api.routes.generation import generation_client, resolve_model_job
from service.errors import UnavailableError

router = APIRouter(tags=["generation"])
Tenant = Annotated[str, Depends(tenant_of)]
Ctx = Annotated[Context, Depends(get_context)]
MAX_TOKENS = 1_000_000


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(..., min_length=1, max_length=128, description="a succeeded job's id or name")
    prompt: str = Field(..., max_length=4_000_000)
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(..., min_length=1, max_length=128, description="a succeeded job's id or name")
    tokens: list[int] = Field(..., max_length=MAX_TOKENS)


async def _forward(ctx: Context, session: Any, tenant: str, model: str, path: str, body: dict[str, Any]) -> Any:
    _, artifact = resolve_model_job(session, tenant, model)
    session.rollback()  # no pooled connection held while the generation server works
    try:
        response = await generation_client(ctx).post(
            path, json={"artifact": artifact.path, "sha256": artifact.sha256, **body}
        )
    except httpx.TransportError as exc:
        raise UnavailableError(f"generation server at {ctx.settings.generation_url} unreachable: {exc}") from exc
    if response.status_code != 200:
        return upstream_error(response.status_code, response.content)
    return response.json()


@router.post("/tokenize", summary="A job's tokenizer: text to token ids (vLLM's /tokenize)")
async def tokenize(body: TokenizeRequest, tenant: Tenant, ctx: Ctx, session: DbSession) -> Any:
    request = {"prompt": body.prompt, "add_special_tokens": body.add_special_tokens}
    result = await _forward(ctx, session, tenant, body.model, "/tokenize", request)
    return result if isinstance(result, JSONResponse) else {**result, "model": body.model}


@router.post("/detokenize", summary="A job's tokenizer: token ids to text (vLLM's /detokenize)")
async def detokenize(body: DetokenizeRequest, tenant: Tenant, ctx: Ctx, session: DbSession) -> Any:
    return await _forward(ctx, session, tenant, body.model, "/detokenize", {"tokens": body.tokens})
