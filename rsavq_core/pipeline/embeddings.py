"""The last step of a run with ``embedding_bits``: the input embedding and the output head, quantized.

For small models with large vocabularies the embedding is most of the checkpoint (SmolLM2-135M:
21 % of its parameters; a 270M model with a 262k-token vocabulary: 63 %), and no budget counted
it. Codes are row-wise scalar (a grid per row and group of ``EMBEDDING_GROUP_SIZE`` columns, the
scalar format): an embedding is read one row per token, so each row dequantizes on its own, and
the runtime's ``QuantEmbedding`` gathers only the rows of a batch's tokens. The head is where the
perplexity is lost (measured: ``bench/bench_embeddings.py --sweep``), so it is quantized by GPTQ
against the Hessian of its inputs, the float model's final hidden states on the calibration
windows; a head tied to the embedding is the same matrix: one layer, stored once, serving both.
An untied embedding is rounded to nearest (a lookup only copies its rows). The blocks' layers are
quantized before this and do not change with it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from rsavq_core.algorithms.scalar import gptq_quantize, rtn_quantize
from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.data.text_files import TextSource
from rsavq_core.errors import CalibrationError, UnsupportedModelError
from rsavq_core.formats.base import QuantizedLayer
from rsavq_core.pipeline.resume import CheckpointedLayers
from rsavq_core.pipeline.source import SourceModel

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
    model: nn.Module,
    bits: int,
    group_size: int = EMBEDDING_GROUP_SIZE,
    head_hessian: torch.Tensor | None = None,
) -> dict[str, QuantizedLayer]:
    """{module name: scalar layer} for the input embedding and the output head of ``model`` (its
    float weights in memory). A tied head maps to the embedding's very layer object.

    ``head_hessian`` [D, D] float32 (``head_input_hessian``): the head, and a tied embedding with
    it, are quantized by GPTQ against it, since the head is where the perplexity is lost (a lookup
    only copies a row); without it, and for an untied embedding, round to nearest."""
    in_name, head_name = embedding_names(model)
    embedding = model.get_submodule(in_name)
    assert isinstance(embedding, nn.Embedding)
    head = model.get_submodule(head_name) if head_name is not None else None
    assert head is None or isinstance(head, nn.Linear)
    tied = head is not None and head.weight is embedding.weight and head.bias is None
    head_layer: QuantizedLayer | None = None
    if head is not None:
        if head_hessian is None:
            head_layer = rtn_quantize(head.weight, bits, group_size, head.bias)
        else:
            head_layer, _ = gptq_quantize(head.weight, head_hessian, bits, group_size, bias=head.bias)
    # The embedding first: a tied head's entry is the alias (loaders build a linear for an alias).
    layers = {
        in_name: head_layer if tied and head_layer is not None else rtn_quantize(embedding.weight, bits, group_size)
    }
    if head_layer is not None and head_name is not None:
        layers[head_name] = head_layer
    return layers


def float_head_hessian(
    source: SourceModel, cfg: QuantConfig, tokens: torch.Tensor | None, text: TextSource | None, micro_batch: int
) -> torch.Tensor | None:
    """The Hessian of the float model's head inputs on the run's calibration windows (``tokens``
    [S, T] int64, or drawn again when the run needed none), or None for a model without a head.
    A streamed model is run block by block from its files: call this before the run's tuned norms
    go into the skeleton, which the blocks read in would overwrite."""
    from rsavq_core.pipeline.calibration import calibration_tokens
    from rsavq_core.runtime.streamed_lm import StreamedCausalLM

    _, head_name = embedding_names(source.model)
    if head_name is None:
        return None
    tokens = tokens if tokens is not None else calibration_tokens(source.tokenizer, cfg, text)
    runner = source.model
    if source.streamed is not None:
        runner = StreamedCausalLM(source.folder, source.device, source.streamed)
    return head_input_hessian(runner, source.model.get_submodule(head_name), tokens.to(source.device), micro_batch)


def head_input_hessian(model: nn.Module, head: nn.Module, tokens: torch.Tensor, micro_batch: int) -> torch.Tensor:
    """[D, D] float32: E_t[x xᵀ] over the inputs x of ``head`` (the final hidden states) while
    ``model`` (whole, or a ``StreamedCausalLM``) runs on ``tokens`` [S, T] int64."""
    sums: list[torch.Tensor] = []
    count = 0

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        nonlocal count
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        if sums:
            sums[0].addmm_(x.T, x)
        else:
            sums.append(x.T @ x)
        count += x.shape[0]

    handle = head.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for batch in torch.split(tokens, micro_batch):
                model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    if not sums:
        raise CalibrationError("the output head saw no calibration tokens")
    return sums[0].div_(count)


def with_embeddings(
    layers: Mapping[str, QuantizedLayer], embeddings: Mapping[str, QuantizedLayer]
) -> Mapping[str, QuantizedLayer]:
    """The run's layers and the embedding layers as one mapping (a streamed run's stay on disk)."""
    if isinstance(layers, CheckpointedLayers):
        return layers.including(embeddings)
    return {**layers, **embeddings}
