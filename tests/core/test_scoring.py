"""Per-token log-probabilities for echo / logprobs (rsavq_core.runtime.scoring) against a direct
float32 log-softmax of the model's logits."""

from __future__ import annotations

import pytest
import torch

from rsavq_core.runtime import scoring


def _direct(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)  # [T-1, V]


@pytest.mark.parametrize("echo", [True, False])
def test_scores_are_the_models_log_probabilities_in_any_chunking(tiny_llama, monkeypatch, echo: bool) -> None:
    model, tokenizer = tiny_llama
    prompt = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    completion = tokenizer(" Paris, a city", add_special_tokens=False)["input_ids"]
    ids = [*prompt, *completion]
    direct = _direct(model, ids)
    got = scoring.score_completion(model, tokenizer, prompt, completion, " Paris, a city", top=3, echo=echo)
    monkeypatch.setattr(scoring, "SCORE_CHUNK", 2)  # several chunks, one of them partial
    chunked = scoring.score_completion(model, tokenizer, prompt, completion, " Paris, a city", top=3, echo=echo)
    assert chunked == got
    first = 0 if echo else len(prompt)
    assert len(got.tokens) == len(ids) - first
    for k, t in enumerate(range(first, len(ids))):
        if t == 0:
            assert got.token_logprobs[k] is None and got.top_logprobs[k] is None
            continue
        assert got.token_logprobs[k] == pytest.approx(direct[t - 1, ids[t]].item(), abs=1e-5)
        best = direct[t - 1].topk(3)
        top = got.top_logprobs[k]
        assert top is not None
        assert max(top.values()) == pytest.approx(best.values[0].item(), abs=1e-5)
    assert "".join(got.tokens) == (got.echo + " Paris, a city" if echo else " Paris, a city")
    assert got.text_offset[0] == 0  # the first returned token starts the returned text


def test_every_token_of_a_character_split_over_tokens_is_reported(tiny_llama) -> None:
    model, tokenizer = tiny_llama
    prompt = tokenizer("A bird:", add_special_tokens=False)["input_ids"]
    text = " 🦜"
    completion = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode(completion[:k]) for k in range(1, len(completion))]
    assert any(p.endswith("\ufffd") for p in pieces), "the emoji spans several byte-level tokens"
    got = scoring.score_completion(model, tokenizer, prompt, completion, text, top=0, echo=False)
    assert len(got.tokens) == len(completion) and None not in got.token_logprobs
