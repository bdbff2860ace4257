"""Text generation from a float or quantized model through transformers' ``generate`` (KV cache).

``stream_completion`` is what the generation server runs: it yields text deltas as tokens are
produced, honours stop strings (never emitting text past one, nor a partial match of one that
may still complete), and ends with the finish reason and token counts that OpenAI-style APIs
report. ``generate_text`` is the one-shot form the command line uses.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from rsavq_core.errors import ConfigError
from rsavq_core.runtime.scoring import TokenScores


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError("max_tokens must be at least 1")
        if not 0 <= self.temperature <= 2:
            raise ConfigError("temperature must be in [0, 2]")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p must be in (0, 1]")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise ConfigError("stop takes at most 4 non-empty strings")


@dataclass
class Completion:
    """The end of a stream: what was generated and why it ended ("stop" or "length")."""

    text: str = ""
    finish_reason: str = "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    scores: TokenScores | None = None  # per-token log-probabilities, when asked for (``runtime.scoring``)


class _TextStops(StoppingCriteria, BaseStreamer):
    """Receives each new token (streamer) and tells generate to stop (criterion) at a stop string.

    Text is released only up to the point where no stop string can still begin, and never ends in
    an incomplete UTF-8 sequence (the tokenizer decodes those as U+FFFD until the rest arrives).
    """

    def __init__(
        self, tokenizer: Any, stops: Sequence[str], prompt_len: int, cancel: threading.Event | None = None
    ) -> None:
        self.tokenizer, self.stops, self.prompt_len = tokenizer, tuple(stops), prompt_len
        self.ids: list[int] = []  # generated ids seen so far
        self.streamed: list[int] = []  # those the streamer hook received
        self.text, self.sent, self.stopped = "", 0, False
        self.cancel = cancel or threading.Event()  # set: stop generating at the next token
        self.deltas: queue.Queue[str | None] = queue.Queue()
        self._skip_prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self._skip_prompt:  # generate() first hands the streamer the prompt
            self._skip_prompt = False
            return
        self.streamed.extend(int(t) for t in value.reshape(-1).tolist())
        self._advance(list(self.streamed))

    def _advance(self, ids: list[int]) -> None:
        """Take the generated ids so far. Both hooks call this (their order differs between
        transformers versions); whichever sees a new token first processes it."""
        if self.stopped or len(ids) <= len(self.ids):
            return
        self.ids = ids
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._release(cut)
            return
        self._release(len(self.text) - self._pending_tail())

    def _pending_tail(self) -> int:
        """Characters at the end that might be the start of a stop string or of a UTF-8 sequence."""
        tail = 1 if self.text.endswith("\ufffd") else 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:k]):
                    tail = max(tail, k)
                    break
        return tail

    def _release(self, upto: int) -> None:
        if upto > self.sent:
            self.deltas.put(self.text[self.sent : upto])
            self.sent = upto

    def end(self) -> None:
        if not self.stopped:
            self._release(len(self.text))
        self.deltas.put(None)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self._advance(input_ids[0, self.prompt_len :].tolist())
        done = self.stopped or self.cancel.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def _generate_kwargs(tokenizer: Any, params: SamplingParams) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_new_tokens": params.max_tokens,
        "do_sample": params.temperature > 0,
        "pad_token_id": getattr(tokenizer, "pad_token_id", None) or getattr(tokenizer, "eos_token_id", None),
    }
    if params.temperature > 0:
        kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=None)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def stream_completion(
    model: nn.Module,
    tokenizer: Any,
    prompt_ids: list[int],
    params: SamplingParams,
    cancel: threading.Event | None = None,
) -> Iterator[str | Completion]:
    """Yield text deltas, then one ``Completion``. ``prompt_ids``: the tokenized prompt (non-empty).
    Setting ``cancel`` stops generation at the next token (the Completion then says "stop").

    generate() runs in a helper thread feeding a queue, so the caller can forward each delta as
    it appears. Callers must serialize calls per model (the seed is the process's global RNG).
    """
    if not prompt_ids:
        raise ConfigError("the prompt is empty")
    device = next(iter(model.parameters())).device
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    stops = _TextStops(tokenizer, params.stop, len(prompt_ids), cancel)
    if params.seed is not None:
        torch.manual_seed(params.seed)
    result: dict[str, Any] = {}
    hf: Any = model  # a transformers model: generate() is not an nn.Module method to a type checker

    def run() -> None:
        try:
            with torch.inference_mode():
                result["ids"] = hf.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    streamer=stops,
                    stopping_criteria=StoppingCriteriaList([stops]),
                    **_generate_kwargs(tokenizer, params),
                )
        except BaseException as exc:  # re-raised in the caller's thread below
            result["error"] = exc
            stops.deltas.put(None)

    thread = threading.Thread(target=run, name="generate", daemon=True)
    thread.start()
    try:
        while (delta := stops.deltas.get()) is not None:
            yield delta
    finally:  # also when the consumer closes us early (a client disconnected): free the device
        stops.cancel.set()
        thread.join()
    if "error" in result:
        raise result["error"]
    new_ids = result["ids"][0, len(prompt_ids) :].tolist()
    eos = _eos_ids(model, tokenizer)
    hit_eos = bool(new_ids) and new_ids[-1] in eos
    finish = "stop" if stops.stopped or hit_eos else "length"
    yield Completion(
        text=stops.text[: stops.sent],
        finish_reason=finish,
        prompt_tokens=len(prompt_ids),
        completion_tokens=len(new_ids),
        token_ids=new_ids,
    )


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = ids if isinstance(ids, list) else [ids]
    return {i for i in [*ids, getattr(tokenizer, "eos_token_id", None)] if i is not None}


def complete(model: nn.Module, tokenizer: Any, prompt_ids: list[int], params: SamplingParams) -> Completion:
    """``stream_completion`` run to the end."""
    *_, last = stream_completion(model, tokenizer, prompt_ids, params)
    assert isinstance(last, Completion)
    return last


def generate_text(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> str:
    """The continuation of ``prompt`` (greedy when temperature == 0, else nucleus sampling)."""
    # Raw text, no special tokens: the bundled model's BOS is a chat token (assets.md).
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    return complete(model, tokenizer, ids, params).text
