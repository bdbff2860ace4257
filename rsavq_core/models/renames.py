"""The names transformers gives a checkpoint's tensors when it loads them.

transformers 5 renames some stored tensors on load (GPT-NeoX's ``embed_out`` is the model's
``lm_head``; legacy ``LayerNorm.gamma``) and converts others (a mixture-of-experts checkpoint's
per-expert matrices are stacked into one 3-D parameter). A streamed model reads each parameter
from the files itself, so it asks transformers for the same renames; a checkpoint that needs a
conversion cannot be read one tensor at a time and is loaded whole instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from torch import nn

log = logging.getLogger(__name__)


def names_on_load(model: nn.Module, stored: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """({model's name: stored name} for each stored tensor, [stored names transformers would convert,
    not just rename]). Without transformers' conversion registry (older versions), names are kept."""
    keys = list(stored)
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        log.debug("this transformers has no conversion registry: stored names are the model's")
        return {key: key for key in keys}, []
    transforms = get_model_conversion_mapping(model)  # type: ignore[arg-type]  # a PreTrainedModel
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names: dict[str, str] = {}
    converted: list[str] = []
    for key in keys:
        name, converter = rename_source_key(key, renamings, converters)
        if converter is not None:
            converted.append(key)
        else:
            names[name] = key
    return names, converted
