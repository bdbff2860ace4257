"""The generation server's requests, and turning one into token ids, sampling and events."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rsavq_core.errors import ConfigError
from rsavq_core.runtime.generation import Completion, SamplingParams, stream_completion
from rsavq_core.runtime.scoring import MAX_TOP_LOGPROBS, score_completion
from worker.generation.model_pool import Loaded

DEFAULT_MAX_TOKENS = 256  # when neither the request nor the model's config bounds a chat answer


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


def prompt_ids(loaded: Loaded, req: GenerateRequest) -> list[int]:
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


def result_body(done: Completion) -> dict[str, Any]:
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


def sampling(loaded: Loaded, req: GenerateRequest, prompt_len: int) -> SamplingParams | None:
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


def completions(
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
