"""The last step of a run with ``embedding_bits``: the input embedding and an untied head, quantized.

For small models with large vocabularies the embedding is most of the checkpoint (SmolLM2-135M:
21 % of its parameters; a 270M model with a 262k-token vocabulary: 63 %), and no budget counted
it. Codes are row-wise scalar (min-max grid per row and group of ``EMBEDDING_GROUP_SIZE``
columns, the scalar format): an embedding is read one row per token, so each row dequantizes on
its own, and the runtime's ``QuantEmbedding`` gathers only the rows of a batch's tokens. A head
tied to the embedding is the same matrix: one layer, stored once, serving both. The blocks'
layers are quantized before this and do not change with it.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from rsavq_core.algorithms.scalar import rtn_quantize
from rsavq_core.errors import UnsupportedModelError
from rsavq_core.formats.base import QuantizedLayer
from rsavq_core.pipeline.resume import CheckpointedLayers

# Columns per scale and zero point (two fp16 values: 0.5 bit per weight at 64). Measured against
# 32, 128 and one group per row by ``bench/bench_embeddings.py`` (README, "Embeddings in the budget").
EMBEDDING_GROUP_SIZE = 64


def embedding_names(model: nn.Module) -> tuple[str, str | None]:
    """(module name of the input embedding, of the output head or None when it is not an
    ``nn.Linear`` of the embedding's shape); ``UnsupportedModelError`` without an input embedding."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    if not isinstance(embedding, nn.Embedding):
        raise UnsupportedModelError(f"{type(model).__name__} has no nn.Embedding input embedding to quantize")
    head = get_out() if callable(get_out) else None
    names = {id(module): name for name, module in model.named_modules()}
    head_name = names.get(id(head)) if isinstance(head, nn.Linear) else None
    return names[id(embedding)], head_name


def quantize_embeddings(
    model: nn.Module, bits: int, group_size: int = EMBEDDING_GROUP_SIZE
) -> dict[str, QuantizedLayer]:
    """{module name: scalar layer} for the input embedding and the output head of ``model`` (its
    float weights in memory). A tied head maps to the embedding's very layer object."""
    in_name, head_name = embedding_names(model)
    embedding = model.get_submodule(in_name)
    assert isinstance(embedding, nn.Embedding)
    layer = rtn_quantize(embedding.weight, bits, group_size)
    layers: dict[str, QuantizedLayer] = {in_name: layer}
    if head_name is not None:
        head = model.get_submodule(head_name)
        assert isinstance(head, nn.Linear)
        tied = head.weight is embedding.weight and head.bias is None
        layers[head_name] = layer if tied else rtn_quantize(head.weight, bits, group_size, head.bias)
    return layers


def with_embeddings(
    layers: Mapping[str, QuantizedLayer], embeddings: Mapping[str, QuantizedLayer]
) -> Mapping[str, QuantizedLayer]:
    """The run's layers and the embedding layers as one mapping (a streamed run's stay on disk)."""
    if isinstance(layers, CheckpointedLayers):
        return layers.including(embeddings)
    return {**layers, **embeddings}
