"""The ablation's rows: one feature added per row, every row valid, a row whose configuration was
already measured at the same width is not run again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.runs import ablation


def test_each_feature_row_changes_only_what_it_names() -> None:
    feature_rows = [(label, knobs) for label, method, knobs in ablation.ROWS if method == "rsavq" and knobs]
    labels = [label for label, _ in ablation.FEATURE_STEPS]
    assert [label for label, _ in feature_rows] == labels
    previous = QuantConfig.for_method("rsavq", bits=2, **ablation.FEATURES_OFF).to_dict()
    for (label, knobs), (_, turned_on) in zip(feature_rows, ablation.FEATURE_STEPS, strict=True):
        flat = QuantConfig.for_method("rsavq", bits=2, **knobs).to_dict()
        changed = {k for k in flat if flat[k] != previous[k]}
        assert changed == set(turned_on) - {k for k, v in turned_on.items() if previous[k] == v}, label
        previous = flat
    for bits in (2, 3):  # every row is a valid configuration at both widths
        for _, method, knobs in ablation.ROWS:
            QuantConfig.for_method(method, bits=bits, **knobs)


def test_a_configuration_already_measured_is_shown_not_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[str] = []

    def fake_run(label: str, fn: Any, model: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        runs.append(label)
        if isinstance(args[0], QuantConfig):  # a quantization row
            return {"config": args[0].to_dict(), "eval": {"perplexity": {"ppl": 1.0}}}
        return {"perplexity": {"ppl": 1.0}}

    monkeypatch.setattr(ablation, "in_fresh_process", fake_run)
    monkeypatch.setattr(ablation, "ROWS", [("a", "rtn", {"group_size": 64}), ("b", "rtn", {"group_size": 64})])
    result = ablation.run_ablation("m", [3], out_dir=tmp_path, tasks=None, limit=None)
    assert runs == ["FP", "a"]
    b = next(r for r in result["rows"] if r["label"] == "b")
    assert b["same_as"] == "a" and b["eval"]["perplexity"]["ppl"] == 1.0
