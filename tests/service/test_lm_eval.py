"""lm-evaluation-harness itself, with its ``local-completions`` model, against a running service.

The multiple-choice task is built from the bundled ARC-Easy items (the first N), formatted as
``evaluation.zeroshot`` formats them; lm-eval scores it through /v1/completions (echo, logprobs,
token-id prompts in batches) and must reach exactly the accuracy our own zero-shot evaluation of
the same job gives on the same items. A ``generate_until`` task runs too, and its answers are the
library's greedy completions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from rsavq_core.evaluation.zeroshot import load_task, task_rows, zero_shot
from rsavq_core.runtime.generation import SamplingParams, complete
from tests.service.test_generation_api import checkpoint, reference, stack  # noqa: F401

log = logging.getLogger(__name__)
ITEMS = 20  # ARC-Easy items: 80 log-likelihood requests
GENERATE = 3  # generate_until items

MULTIPLE_CHOICE = """\
task: rsavq_arc_easy_sample
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: query
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
"""

GENERATE_UNTIL = """\
task: rsavq_arc_easy_generate
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: generate_until
doc_to_text: query
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


def _tasks(folder: Path) -> None:
    """The two task YAMLs and their JSONL data in ``folder`` (an lm-eval include path)."""
    items = load_task("arc_easy", ITEMS)
    rows = task_rows("arc_easy")[:ITEMS]
    with (folder / "mc.jsonl").open("w") as fh:
        for it, row in zip(items, rows):
            # our continuations are " " + choice text: lm-eval adds that delimiter itself
            doc = {"query": it.contexts[0], "choices": [c[1:] for c in it.continuations], "gold": it.gold}
            assert doc["choices"] == list(row["choices"]["text"])
            fh.write(json.dumps(doc) + "\n")
    with (folder / "gen.jsonl").open("w") as fh:
        for it in items[:GENERATE]:
            fh.write(json.dumps({"query": it.contexts[0], "answer": it.continuations[it.gold][1:]}) + "\n")
    (folder / "mc.yaml").write_text(MULTIPLE_CHOICE.format(data=folder / "mc.jsonl"))
    (folder / "gen.yaml").write_text(GENERATE_UNTIL.format(data=folder / "gen.jsonl"))


def test_lm_eval_local_completions_matches_our_zero_shot(
    stack: dict[str, Any],  # noqa: F811
    reference,  # noqa: F811
    checkpoint: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("OPENAI_API_KEY", stack["keys"]["alice"])
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _tasks(tmp_path)
    model_args = (
        f"model={stack['done']},base_url={stack['url']}/v1/completions,tokenizer={checkpoint},"
        "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1,batch_size=4"
    )
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=model_args,
        tasks=["rsavq_arc_easy_sample", "rsavq_arc_easy_generate"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    assert results is not None
    theirs = results["results"]["rsavq_arc_easy_sample"]
    model, tokenizer = reference
    ours = zero_shot(model, tokenizer, ["arc_easy"], limit=ITEMS)["tasks"]["arc_easy"]
    log.info("lm-eval acc %s acc_norm %s; ours %s", theirs["acc,none"], theirs["acc_norm,none"], ours)
    assert theirs["acc,none"] == ours["acc"] and theirs["acc_norm,none"] == ours["acc_norm"]
    assert ours["n"] == ITEMS and 0 < ours["acc"] < 1  # the items discriminate: not all one way

    samples = results["samples"]["rsavq_arc_easy_generate"]
    assert len(samples) == GENERATE
    for sample in samples:
        context = sample["arguments"][0][0]  # (context, generation kwargs) of its one request
        ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        want = complete(model, tokenizer, ids, SamplingParams(max_tokens=8, temperature=0, stop=("\n",))).text
        assert sample["resps"][0][0] == want
