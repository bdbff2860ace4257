"""Zero-shot evaluation: lm-eval formatting on real items, scoring mechanics, the bundled model."""

from __future__ import annotations

import pytest
import torch

from rsavq_core.errors import ConfigError
from rsavq_core.evaluation import zero_shot
from rsavq_core.evaluation import zeroshot as zs
from rsavq_core.evaluation.zeroshot import (
    Item,
    accuracy,
    continuation_logprobs,
    encode_pair,
    hellaswag_preprocess,
    load_task,
    task_rows,
)


def manual_logprob(model, tok, context: str, continuation: str) -> float:
    """Unbatched, unpadded log p(continuation | context), in float64."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)  # [T, V]
    return sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))


def test_winogrande_fills_blank_and_scores_the_rest() -> None:
    item = load_task("winogrande", 1)[0]
    # "Sarah was a much better surgeon than Maria so _ always got the easier cases." answer "2"
    assert item.contexts == (
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    )
    assert item.continuations == (" always got the easier cases.",) * 2
    assert item.gold == 1


def test_hellaswag_preprocessing() -> None:
    raw = "[header] How to become [title] Obtain your diploma. [step] This job  "
    assert hellaswag_preprocess(raw) == " How to become. Obtain your diploma. This job"
    first = load_task("hellaswag", 1)[0]
    # ctx_b "he" is capitalized after ctx_a + " ".
    assert first.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert first.continuations[3] == " starts pulling up roofing on a roof."
    assert first.gold == 3
    wikihow = next(r for r in task_rows("hellaswag") if r["source_id"] == "wikihow~4")
    item = zs._format_hellaswag(wikihow)
    assert item.contexts[0].startswith("Personal Care and Style: How to become a fashion consultant. Obtain")
    assert "[" not in item.contexts[0] and all("[" not in c for c in item.continuations)
    assert item.norm_lengths == tuple(len(c) - 1 for c in item.continuations)


def test_arc_and_piqa_formatting() -> None:
    arc = load_task("arc_easy", 1)[0]
    assert arc.contexts[0] == "Question: Which technology was developed most recently?\nAnswer:"
    assert arc.continuations == (" cellular telephone", " television", " refrigerator", " airplane")
    assert arc.gold == 0 and arc.norm_lengths == (18, 10, 12, 8)
    digit = task_rows("arc_easy")[8]  # labels "1".."4", answerKey "1"
    assert digit["choices"]["label"][0] == "1" and zs._format_arc(digit).gold == int(digit["answerKey"]) - 1
    piqa = load_task("piqa", 1)[0]
    assert piqa.contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert piqa.continuations[0].startswith(" Provide the guinea pig") and piqa.gold == 0


def test_encode_pair_moves_trailing_space(tiny_llama) -> None:
    _, tok = tiny_llama
    moved = encode_pair(tok, "The capital of France is ", "Paris")
    assert moved == encode_pair(tok, "The capital of France is", " Paris")
    ctx, cont = encode_pair(tok, "Question: x\nAnswer:", " yes")
    assert ctx + cont == tok("Question: x\nAnswer: yes", add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id not in ctx


PAIRS = [
    ("Question: Which is a fruit?\nAnswer:", " an apple"),
    ("Question: Which is a fruit?\nAnswer:", " a car"),
    ("The cat sat on the", " mat."),
    ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases of all."),
]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batched_logprobs_match_manual(tiny_llama, batch_size: int) -> None:
    model, tok = tiny_llama
    got = continuation_logprobs(model, tok, PAIRS, batch_size=batch_size)
    assert got == pytest.approx([manual_logprob(model, tok, c, k) for c, k in PAIRS], abs=1e-3)


def test_scoring_picks_highest_loglikelihood(tiny_llama, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = tiny_llama
    manual = [manual_logprob(model, tok, c, k) for c, k in PAIRS]
    best_first, best_second = int(manual[0] < manual[1]), int(manual[2] < manual[3])
    right = [
        Item(tuple(c for c, _ in p), tuple(k for _, k in p), (1, 1), g)
        for p, g in ((PAIRS[:2], best_first), (PAIRS[2:], best_second))
    ]
    wrong = [Item(i.contexts, i.continuations, i.norm_lengths, 1 - i.gold) for i in right]
    monkeypatch.setitem(zs.TASKS, "toy_right", ("", zs._format_piqa, True))
    monkeypatch.setitem(zs.TASKS, "toy_wrong", ("", zs._format_piqa, False))
    monkeypatch.setattr(zs, "load_task", lambda name, limit: right if name == "toy_right" else wrong)
    result = zero_shot(model, tok, ["toy_right", "toy_wrong"], batch_size=3)
    assert result["tasks"]["toy_right"] == {"acc": 1.0, "acc_norm": 1.0, "n": 2}
    assert result["tasks"]["toy_wrong"] == {"acc": 0.0, "acc_norm": None, "n": 2}
    assert result["average"] == result["average_acc"] == 0.5


def test_acc_norm_divides_by_characters() -> None:
    item = Item(("q", "q"), (" aa", " bbbbbbbb"), (2, 8), gold=1)
    # sums favour choice 0, per-character scores favour choice 1
    assert accuracy([item], [[-4.0, -6.0]], normalized=True) == {"acc": 0.0, "acc_norm": 1.0, "n": 1}
    assert accuracy([item], [[-4.0, -4.0]], normalized=False)["acc"] == 0.0  # ties go to the first


def test_limit_and_result_shape(tiny_llama) -> None:
    model, tok = tiny_llama
    calls: list[tuple[int, int]] = []
    result = zero_shot(
        model,
        tok,
        ["piqa", "winogrande"],
        limit=3,
        batch_size=4,
        progress=lambda stage, d, t, detail=None: calls.append((d, t)),
    )
    assert result["limit"] == 3
    assert {name: r["n"] for name, r in result["tasks"].items()} == {"piqa": 3, "winogrande": 3}
    assert result["tasks"]["winogrande"]["acc_norm"] is None
    piqa, wino = result["tasks"]["piqa"], result["tasks"]["winogrande"]
    assert result["average"] == pytest.approx((piqa["acc_norm"] + wino["acc"]) / 2)
    assert result["average_acc"] == pytest.approx((piqa["acc"] + wino["acc"]) / 2)
    assert calls[-1] == (12, 12) and len(calls) == 3


def test_unknown_task_and_bad_limit(tiny_llama) -> None:
    model, tok = tiny_llama
    with pytest.raises(ConfigError, match="arc_challenge, arc_easy, hellaswag, piqa, winogrande"):
        zero_shot(model, tok, ["piqa", "boolq"])
    with pytest.raises(ConfigError):
        zero_shot(model, tok, [])
    with pytest.raises(ConfigError, match="limit"):
        zero_shot(model, tok, ["piqa"], limit=0)


@pytest.mark.slow
def test_bundled_model_above_chance_on_piqa(smol) -> None:
    model, tok = smol
    result = zero_shot(model, tok, ["piqa"], limit=50)
    assert result["tasks"]["piqa"]["n"] == 50
    assert result["tasks"]["piqa"]["acc"] > 0.55
