"""``echo`` and ``logprobs`` of /v1/completions: the prompt scored as the library scores it, in
the shape lm-evaluation-harness's ``local-completions`` reads (its ``parse_logprobs`` included)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.service.test_generation_api import PROMPT, _client, checkpoint, reference, stack  # noqa: F401


def _library_logprobs(model: Any, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]


def test_echo_scores_token_id_prompts_as_the_library_does(stack: dict[str, Any], reference) -> None:  # noqa: F811
    model, tokenizer = reference
    prompts = [tokenizer(PROMPT + " Paris.")["input_ids"], tokenizer("Water boils at 100 degrees.")["input_ids"]]
    out = _client(stack).completions.create(model=stack["done"], prompt=prompts, max_tokens=0, echo=True, logprobs=1)
    assert [c.index for c in out.choices] == [0, 1]
    for ids, c in zip(prompts, out.choices):
        lp = c.logprobs
        assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
        assert lp.top_logprobs is not None and lp.text_offset is not None
        assert c.text == tokenizer.decode(ids) and len(lp.tokens) == len(ids)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
        assert lp.token_logprobs[1:] == pytest.approx(_library_logprobs(model, ids), abs=2e-4)
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        assert all(c.text[o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens))
        assert all(len(top) == 1 for top in lp.top_logprobs[1:])
    assert out.usage is not None
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == sum(map(len, prompts))


def test_lm_evals_request_and_parser_read_our_answer(stack: dict[str, Any], reference) -> None:  # noqa: F811
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    model, tokenizer = reference
    context, continuation = tokenizer(PROMPT)["input_ids"], tokenizer(" Paris")["input_ids"]
    ids = context + continuation
    # What local-completions sends for a log-likelihood request (max_tokens 1, echo, logprobs 1).
    payload = LocalCompletionsAPI._create_payload(SimpleNamespace(model=stack["done"]), [ids], generate=False)
    out = _client(stack).completions.create(**payload)
    ((total, greedy),) = LocalCompletionsAPI.parse_logprobs(out.model_dump(), ctxlens=[len(context)])
    assert total == pytest.approx(sum(_library_logprobs(model, ids)[len(context) - 1 :]), abs=2e-4)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, len(context) - 1 : -1]
    assert greedy == bool((logits.argmax(-1) == torch.tensor(continuation)).all())


def test_logprobs_of_a_generated_completion(stack: dict[str, Any]) -> None:  # noqa: F811
    out = _client(stack).completions.create(model=stack["done"], prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    c = out.choices[0]
    lp = c.logprobs
    assert lp is not None and lp.tokens is not None and lp.text_offset is not None
    assert lp.token_logprobs is not None and lp.top_logprobs is not None and out.usage is not None
    assert len(lp.tokens) == out.usage.completion_tokens and "".join(lp.tokens) == c.text
    assert lp.text_offset[0] == 0
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and chosen == max(top.values())  # greedy: each token is the likeliest


def test_tokenize_and_detokenize_use_the_jobs_tokenizer(stack: dict[str, Any], reference) -> None:  # noqa: F811
    import httpx

    _, tokenizer = reference
    headers = {"Authorization": f"Bearer {stack['keys']['alice']}"}
    url = stack["url"]
    r = httpx.post(f"{url}/tokenize", json={"model": "smol-rtn4", "prompt": PROMPT}, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    ids = tokenizer(PROMPT)["input_ids"]
    assert r.json() == {"tokens": ids, "count": len(ids), "max_model_len": 8192, "model": "smol-rtn4"}
    back = httpx.post(f"{url}/detokenize", json={"model": stack["done"], "tokens": ids}, headers=headers, timeout=60)
    assert back.status_code == 200 and back.json() == {"prompt": PROMPT}
    bad = httpx.post(f"{url}/detokenize", json={"model": stack["done"], "tokens": [-1]}, headers=headers, timeout=60)
    assert bad.status_code == 422 and "token ids must lie in" in bad.json()["error"]["message"]
    assert httpx.post(f"{url}/tokenize", json={"model": "nope", "prompt": "x"}, headers=headers).status_code == 404
    assert httpx.post(f"{url}/tokenize", json={"model": stack["done"], "prompt": "x"}).status_code == 401
