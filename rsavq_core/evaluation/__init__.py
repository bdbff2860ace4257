"""Quality evaluation: ``wiki-holdout-512`` perplexity and lm-eval style zero-shot accuracy."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rsavq_core.data.text_files import EVAL_WINDOWS, TextSource
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
    texts: Sequence[TextSource] = (),
) -> dict[str, Any]:
    """Perplexity and/or zero-shot accuracy of a loaded (float or quantized) model, with timings.

    ``texts``: the user's own evaluation texts; each adds a perplexity under ``perplexity_on``
    (keyed by the text's label). progress(stage, done, total) is called with stage "perplexity"
    or "zero-shot".
    """

    out: dict[str, Any] = {}
    if ppl:
        t0 = time.perf_counter()
        out["perplexity"] = perplexity(
            model, tokenizer, n_windows=perplexity_windows or EVAL_WINDOWS, progress=progress
        )
        out["perplexity"]["seconds"] = time.perf_counter() - t0
    for text in texts:
        t0 = time.perf_counter()
        windows = perplexity_windows or EVAL_WINDOWS
        result = perplexity(model, tokenizer, n_windows=windows, progress=progress, source=text)
        out.setdefault("perplexity_on", {})[text.label] = {**result, "seconds": time.perf_counter() - t0}
    if tasks:
        t0 = time.perf_counter()
        out["zero_shot"] = zero_shot(model, tokenizer, list(tasks), limit=limit, progress=progress)
        out["zero_shot"]["seconds"] = time.perf_counter() - t0
    return out
