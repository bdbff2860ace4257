"""Per-token log-probabilities of a prompt and its completion (the ``logprobs`` / ``echo`` of
OpenAI's legacy completions, which lm-evaluation-harness's log-likelihood tasks rely on).

One forward pass over prompt + completion scores every token under the model's own distribution
(temperature 1, no top-p), in float32, exactly as ``evaluation.zeroshot`` scores continuations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rsavq_core.evaluation.perplexity import model_device, output_logits

MAX_TOP_LOGPROBS = 20


@dataclass
class TokenScores:
    """Scored tokens, in order: the prompt's (with ``echo``) then the completion's."""

    tokens: list[str]  # each token's own text
    token_logprobs: list[float | None]  # log p(token | the tokens before it); None for a sequence's first
    top_logprobs: list[dict[str, float] | None]  # the ``top`` most likely tokens there (None where unscored)
    text_offset: list[int]  # where each token starts in the returned text, in characters
    echo: str  # the prompt's text, returned before the completion ('' without echo)


def score_completion(
    model: nn.Module,
    tokenizer: Any,
    prompt_ids: list[int],
    completion_ids: list[int],
    completion_text: str,
    *,
    top: int,
    echo: bool,
) -> TokenScores:
    """The scores of the completion's tokens (and, with ``echo``, of the prompt's).

    Args:
        model: a causal LM; logits come from ``forward(input_ids=[1, T] int64)``.
        prompt_ids / completion_ids: token ids; ``completion_text`` is what the completion returned
            (cut at a stop string: tokens past it are not reported).
        top: how many most likely alternatives to list per token (0..MAX_TOP_LOGPROBS).
        echo: also score and return the prompt.
    """
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top must lie in [0, {MAX_TOP_LOGPROBS}]")
    ids = [*prompt_ids, *completion_ids]
    with torch.inference_mode():
        logits = output_logits(model(input_ids=torch.tensor([ids], dtype=torch.long, device=model_device(model))))
        logp = logits[0, :-1].float().log_softmax(-1)  # [T-1, V] float32: position t predicts token t+1
        target = torch.tensor(ids[1:], dtype=torch.long, device=logp.device)[:, None]
        chosen = [None, *logp.gather(-1, target)[:, 0].tolist()]
        best = logp.topk(top, dim=-1) if top else None
    prompt_text = tokenizer.decode(prompt_ids)
    first = 0 if echo else len(prompt_ids)
    # Character offsets in prompt text + completion: decoding whole prefixes keeps characters that
    # span several tokens (UTF-8 pieces, merged spaces) where the text has them.
    end = len(prompt_text) + len(completion_text)
    scores = TokenScores([], [], [], [], prompt_text if echo else "")
    for t in range(first, len(ids)):
        start = len(tokenizer.decode(ids[:t])) if t else 0
        if t > len(prompt_ids) and start >= end:
            break  # past a stop string: the completion's text ends before this token
        scores.tokens.append(tokenizer.decode([ids[t]]))
        scores.token_logprobs.append(chosen[t])
        alternatives: dict[str, float] | None = None
        if t:
            alternatives = {}
            if best is not None:
                for i, v in zip(best.indices[t - 1].tolist(), best.values[t - 1].tolist(), strict=True):
                    # tokens that decode alike keep the likelier one: the first maximum is the argmax
                    alternatives.setdefault(tokenizer.decode([i]), v)
        scores.top_logprobs.append(alternatives)
        scores.text_offset.append(start if echo else start - len(prompt_text))
    return scores
