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
SCORE_CHUNK = 256  # rows of float32 log-softmax at a time: 256 x a 150k vocab is 150 MB


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
    first = 0 if echo else len(prompt_ids)
    lo = max(first - 1, 0)  # logits at position p predict token p + 1: only the scored rows are needed
    with torch.inference_mode():
        logits = output_logits(model(input_ids=torch.tensor([ids], dtype=torch.long, device=model_device(model))))
        chosen_rows, top_values, top_indices = _score_rows(logits[0, lo : len(ids) - 1], ids[lo + 1 :], top)

    def chosen(t: int) -> float | None:  # log p(token t | tokens before it)
        return chosen_rows[t - 1 - lo] if t else None

    prompt_text = tokenizer.decode(prompt_ids)
    # Character offsets in prompt text + completion: decoding whole prefixes keeps characters that
    # span several tokens (UTF-8 pieces, merged spaces) where the text has them.
    end = len(prompt_text) + len(completion_text)
    scores = TokenScores([], [], [], [], prompt_text if echo else "")
    for t in range(first, len(ids)):
        before = tokenizer.decode(ids[:t]) if t else ""
        start = len(before)
        # Past a stop string the completion's text ends before this token. A prefix ending in a
        # replacement character stops inside a character's bytes: this token completes it.
        if t > len(prompt_ids) and start >= end and not before.endswith("\ufffd"):
            break
        scores.tokens.append(tokenizer.decode([ids[t]]))
        scores.token_logprobs.append(chosen(t))
        alternatives: dict[str, float] | None = None
        if t:
            alternatives = {}
            if top:
                for i, v in zip(top_indices[t - 1 - lo], top_values[t - 1 - lo], strict=True):
                    # tokens that decode alike keep the likelier one: the first maximum is the argmax
                    alternatives.setdefault(tokenizer.decode([i]), v)
        scores.top_logprobs.append(alternatives)
        scores.text_offset.append(start if echo else start - len(prompt_text))
    return scores


def _score_rows(
    logits: torch.Tensor, targets: list[int], top: int
) -> tuple[list[float], list[list[float]], list[list[int]]]:
    """Log-probabilities of ``targets`` under ``logits`` and each row's ``top`` best.

    Args:
        logits: [R, V] any float dtype; row r scores ``targets[r]``.
        targets: R token ids.
    Returns: per row, the target's log-probability, the ``top`` best log-probabilities and their
    ids (empty lists when ``top`` is 0). The float32 log-softmax runs SCORE_CHUNK rows at a time, so
    a long echoed prompt never holds [R, V] float32 at once.
    """
    chunk = SCORE_CHUNK
    chosen: list[float] = []
    values: list[list[float]] = []
    indices: list[list[int]] = []
    target = torch.tensor(targets, dtype=torch.long, device=logits.device)[:, None]  # [R, 1] int64
    for lo in range(0, logits.shape[0], chunk):
        logp = logits[lo : lo + chunk].float().log_softmax(-1)  # [<=chunk, V] float32
        chosen += logp.gather(-1, target[lo : lo + chunk])[:, 0].tolist()
        if top:
            best = logp.topk(top, dim=-1)
            values += best.values.tolist()
            indices += best.indices.tolist()
    return chosen, values, indices
