"""Quality evaluation: ``wiki-holdout-512`` perplexity and lm-eval style zero-shot accuracy."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rsavq_core.evaluation.perplexity import perplexity
from rsavq_core.evaluation.zeroshot import DEFAULT_TASKS, zero_shot
from rsavq_core.progress import Progress

__all__ = ["DEFAULT_TASKS", "evaluate_model", "perplexity", "zero_shot"]


def evaluate_model(
    model: Any,
    tokenizer: Any,
    *,
    ppl: bool = True,
    tasks: Sequence[str] | None = None,
    limit: int | None = None,
    perplexity_windows: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Perplexity and/or zero-shot accuracy of a loaded (float or quantized) model, with timings.

    progress(stage, done, total) is called with stage "perplexity" or "zero-shot".
    """

    out: dict[str, Any] = {}
    if ppl:
        t0 = time.perf_counter()
        kwargs = {"n_windows": perplexity_windows} if perplexity_windows else {}
        out["perplexity"] = perplexity(model, tokenizer, progress=progress, **kwargs)
        out["perplexity"]["seconds"] = time.perf_counter() - t0
    if tasks:
        t0 = time.perf_counter()
        out["zero_shot"] = zero_shot(model, tokenizer, list(tasks), limit=limit, progress=progress)
        out["zero_shot"]["seconds"] = time.perf_counter() - t0
    return out
