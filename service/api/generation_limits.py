"""How far one completion may go: new tokens, time, concurrent completions of a tenant, listeners.

At most ``generation_max_tokens`` new tokens (a chat that names none gets
``generation_default_max_tokens``); stopped after ``generation_deadline_s`` (504); at most
``tenant_max_generations`` completions of one tenant at once in this API process (429); and
stopped when its client goes away, streamed or not (the upstream stream is closed, which cancels
the generation on the server).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request

from rsavq_core.errors import ConfigError
from service import errors
from service.errors import TooManyRequestsError

if TYPE_CHECKING:  # deps holds a TenantSlots: a run-time import would be circular
    from service.api.deps import Context


class TenantSlots:
    """Completions running per tenant in this process (the event loop is the only writer)."""

    def __init__(self) -> None:
        self.busy: Counter[str] = Counter()

    def hold(self, tenant: str, limit: int) -> Callable[[], None]:
        """Take a slot (429 when the tenant has ``limit``); returns its release, safe to call twice."""
        if self.busy[tenant] >= limit:
            raise TooManyRequestsError(
                f"this key's tenant has {limit} completions running, the most allowed (RSAVQ_TENANT_MAX_GENERATIONS)",
                retry_after=5,
            )
        self.busy[tenant] += 1
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self.busy[tenant] -= 1

        return release


def bounded_tokens(ctx: Context, asked: int | None) -> int:
    """The new-token budget of a request: what it asked for, else the chat default; never above the cap."""
    limit = ctx.settings.generation_max_tokens
    if asked is not None and asked > limit:
        raise ConfigError(f"max_tokens must be at most {limit} (RSAVQ_GENERATION_MAX_TOKENS), got {asked}")
    return asked if asked is not None else min(ctx.settings.generation_default_max_tokens, limit)


def timed_out(ctx: Context) -> dict[str, Any]:
    message = f"the completion ran past its deadline of {ctx.settings.generation_deadline_s:g} s and was stopped"
    return errors.error_body(504, message, "DeadlineExceeded")


async def unless_gone(request: Request, work: Any, deadline: float) -> Any:
    """``work``'s result; None when the client hung up first; ``TimeoutError`` past ``deadline``
    (monotonic). Either way the work is cancelled, which closes the upstream stream."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            left = deadline - time.monotonic()
            done, _ = await asyncio.wait({task}, timeout=max(0.0, min(0.5, left)))
            if done:
                return task.result()
            if time.monotonic() >= deadline:
                raise TimeoutError
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
