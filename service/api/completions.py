"""One OpenAI-style completion over the generation server: its events relayed as one JSON answer or
as a server-sent event stream, with the deadline, the client hanging up, and the generation slot's
release handled once. The routes are in ``service.api.routes.generation``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import Request, Response
from fastapi.responses import JSONResponse
from httpx_sse import aconnect_sse
from sse_starlette import EventSourceResponse, ServerSentEvent

from service import errors
from service.api.deps import Context
from service.api.generation_limits import timed_out, unless_gone
from service.db import Artifact
from service.errors import UnavailableError


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


async def generate(
    request: Request,
    ctx: Context,
    client: httpx.AsyncClient,
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
    base = {"artifact": artifact.path, "sha256": artifact.sha256}
    payloads = [{**base, **p} for p in payloads]
    try:
        first = _events(client, payloads[0])
        head = await anext(first)  # errors (bad prompt, model too big) surface before the 200
    except _Upstream as exc:
        release()
        return upstream_error(exc.status, exc.raw)
    except httpx.TransportError as exc:
        raise UnavailableError(f"generation server at {ctx.settings.generation_url} unreachable: {exc}") from exc
    completion = Completion(ctx, client, model, chat, include_usage, payloads, head, first, deadline)
    if not stream:
        try:
            answer = await unless_gone(request, completion.collect(), deadline)
        except TimeoutError:
            return JSONResponse(timed_out(ctx), status_code=504)
        finally:
            release()
        return Response(status_code=499) if answer is None else answer  # 499: nobody is listening
    return EventSourceResponse(completion.sse(release), sep="\n", headers={"Cache-Control": "no-cache"})


@dataclass
class Completion:
    """The events of every prompt of one request, relayed in OpenAI's shapes."""

    ctx: Context
    client: httpx.AsyncClient
    model: str
    chat: bool
    include_usage: bool
    payloads: list[dict[str, Any]]
    head: dict[str, Any]  # the first prompt's first event, read before answering
    first: AsyncGenerator[dict[str, Any], None]  # the rest of the first prompt's events
    deadline: float  # time.monotonic() past which a stream ends with the deadline's error
    ident: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.ident = f"{'chatcmpl' if self.chat else 'cmpl'}-{self.ident}"

    async def per_prompt(self) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        yield 0, self.head
        async for event in self.first:
            yield 0, event
        for index, payload in enumerate(self.payloads[1:], start=1):
            async for event in _events(self.client, payload):
                yield index, event

    def choice(
        self, index: int, text: str | None, finish: str | None, delta: bool, event: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        if not self.chat:  # with echo / logprobs the generation server's event carries both
            scored = event or {}
            text = scored.get("echo", "") + (text or "")
            return {"index": index, "text": text, "logprobs": scored.get("logprobs"), "finish_reason": finish}
        key = "delta" if delta else "message"
        message = {"role": "assistant", "content": text} if (text is not None or not delta) else {}
        return {"index": index, key: message, "logprobs": None, "finish_reason": finish}

    async def collect(self) -> Any:
        """The whole answer (or the error a prompt ended with)."""
        choices, prompt_tokens, completion_tokens = [], 0, 0
        try:
            async for index, event in self.per_prompt():
                if "error" in event:  # failed after it started
                    return JSONResponse(event, status_code=int(event["error"].get("status") or 500))
                if "finish_reason" in event:
                    choices.append(self.choice(index, event["text"], event["finish_reason"], delta=False, event=event))
                    prompt_tokens += event["prompt_tokens"]
                    completion_tokens += event["completion_tokens"]
        except _Upstream as exc:  # a later prompt of a batch was refused
            return upstream_error(exc.status, exc.raw)
        finally:  # also when cancelled (client gone, deadline): closing upstream cancels the generation
            await self.first.aclose()
        return {
            "id": self.ident,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": _usage(prompt_tokens, completion_tokens),
        }

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> ServerSentEvent:
        body: dict[str, Any] = {
            "id": self.ident,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage
        return ServerSentEvent(json.dumps(body))

    async def sse(self, release: Callable[[], None]) -> AsyncIterator[ServerSentEvent]:
        """The stream's events; ``release`` runs when it ends, however it ends."""
        totals = [0, 0]
        try:
            async for index, event in self.per_prompt():
                if time.monotonic() > self.deadline:  # the deadline: the error is the last event
                    yield ServerSentEvent(json.dumps(timed_out(self.ctx)))
                    return
                if "error" in event:  # the generation server failed mid-stream: its error is the last event
                    yield ServerSentEvent(json.dumps(event))
                    return
                if "finish_reason" in event:
                    totals[0] += event["prompt_tokens"]
                    totals[1] += event["completion_tokens"]
                    yield self.chunk(
                        [self.choice(index, None if self.chat else "", event["finish_reason"], delta=True)]
                    )
                elif event.get("text"):
                    yield self.chunk([self.choice(index, event["text"], None, delta=True)])
        except (_Upstream, httpx.TransportError) as exc:  # the 200 is gone: report in the stream
            message = f"generation failed: {exc}"
            yield ServerSentEvent(json.dumps(errors.error_body(502, message, "UpstreamError")))
            return
        finally:  # also when the client hangs up: close the upstream stream, which cancels the generation
            await self.first.aclose()
            release()
        if self.include_usage:
            yield self.chunk([], _usage(*totals))
        yield ServerSentEvent("[DONE]")
