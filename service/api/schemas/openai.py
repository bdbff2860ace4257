"""Request bodies of the OpenAI-compatible endpoints (``/v1/completions``, ``/v1/chat/completions``).

Unknown fields are ignored, as OpenAI's own clients send ones a server may not know
(``user``, ``metadata``...); fields we know but do not implement (``suffix``, ``n`` > 1, chat
``logprobs``, ...) are refused with a 422 that names them, never silently ignored. Completions take
``echo`` and ``logprobs`` (log-probabilities of the model's own distribution; what
lm-evaluation-harness's ``local-completions`` sends for log-likelihood tasks), not streamed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOPS = 4
MAX_LOGPROBS = 5  # OpenAI's limit for the legacy completions' logprobs


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(..., min_length=1, max_length=128, description="a succeeded job's id or name")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1, description="the range torch's generators take")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    presence_penalty: float = Field(0.0, ge=0, le=0, description="not supported: must be 0")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="not supported: must be 0")
    logit_bias: dict[str, float] | None = Field(None, description="not supported")
    response_format: dict[str, Any] | None = Field(None, description='only {"type": "text"} is supported')
    top_logprobs: int | None = Field(None, description="not supported")

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: Any) -> Any:
        return {"temperature": 1.0, "top_p": 1.0}[info.field_name] if value is None else value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOPS} non-empty strings")
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> _Sampling:
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError('response_format is not supported beyond {"type": "text"}')
        if self.top_logprobs is not None:
            raise ValueError("top_logprobs is not supported")
        return self

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def params(self, max_tokens: int | None) -> dict[str, Any]:
        """Sampling for the generation server; max_tokens None = up to the model's context."""
        return {
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": self.stops(),
            "seed": self.seed,
        }


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(..., description="text, texts, or token ids")
    max_tokens: int = Field(16, ge=0, description="0 (with echo): score the prompt, generate nothing")
    echo: bool = Field(False, description="return the prompt before the completion (with logprobs: scored too)")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="log-probabilities of each returned token and of this many likeliest alternatives",
    )
    suffix: str | None = Field(None, description="not supported")
    best_of: int | None = Field(None, ge=1, le=1, description="only 1 is supported")

    @model_validator(mode="after")
    def _unsupported_completion(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 returns nothing: set echo to score the prompt")
        if self.stream and (self.echo or self.logprobs is not None):
            raise ValueError("echo and logprobs are not supported with stream")
        return self

    def params(self, max_tokens: int | None) -> dict[str, Any]:
        return {**super().params(max_tokens), "logprobs": self.logprobs, "echo": self.echo}

    def prompts(self) -> list[dict[str, Any]]:
        """One generation request fragment per prompt: {"prompt": text} or {"prompt_ids": ids}."""
        p = self.prompt
        if isinstance(p, str):
            return [{"prompt": p}]
        items: list[Any] = list(p)
        if all(isinstance(x, int) for x in items):
            return [{"prompt_ids": items}]
        return [{"prompt": x} if isinstance(x, str) else {"prompt_ids": list(x)} for x in items]


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="not supported")
    tools: list[Any] | None = Field(None, description="not supported")
    tool_choice: Any = Field(None, description='not supported (only "none")')
    functions: list[Any] | None = Field(None, description="not supported")
    function_call: Any = Field(None, description='not supported (only "none")')

    @model_validator(mode="after")
    def _unsupported_chat(self) -> ChatCompletionRequest:
        if self.logprobs:
            raise ValueError("logprobs is not supported")
        if self.tools or self.functions:
            raise ValueError("tools are not supported")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                raise ValueError(f"{name} is not supported")
        return self
