"""Quality evaluation: ``wiki-holdout-512`` perplexity and lm-eval style zero-shot accuracy."""

from rsavq_core.evaluation.perplexity import perplexity
from rsavq_core.evaluation.zeroshot import DEFAULT_TASKS, zero_shot

__all__ = ["DEFAULT_TASKS", "perplexity", "zero_shot"]
