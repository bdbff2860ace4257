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
    result = ablation.run_ablation("m", [3], out_dir=tmp_path, tasks=None, limit=None, rows=["a", "b"])
    assert runs == ["FP", "a"]
    b = next(r for r in result["rows"] if r["label"] == "b")
    assert b["same_as"] == "a" and b["eval"]["perplexity"]["ppl"] == 1.0


def test_a_registered_method_appears_in_the_ablation_without_edits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ARCHITECTURE.md's promise: register a method, and the ablation runs and shows it."""
    from rsavq_core.config.knobs import MethodOptions
    from rsavq_core.methods.registry import QuantMethod, StatsNeeds, register_method, unregister_method

    @register_method
    class Plain(QuantMethod):
        name = "plain-test"
        summary = "a method only this test knows"
        options_type = MethodOptions

        def statistics(self, cfg: QuantConfig) -> StatsNeeds:
            return StatsNeeds()

        def quantize_layer(self, weight, bias, stats, cfg, shared=None):
            raise AssertionError("not run: the ablation's runs are faked here")

    def fake_run(label: str, fn: Any, model: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if isinstance(args[0], QuantConfig):
            return {
                "config": args[0].to_dict(),
                "eval": {"perplexity": {"ppl": 2.0}},
                "bits": {"quantized": {"bpw": 3.0}},
            }
        return {"perplexity": {"ppl": 1.0}}

    try:
        assert ("plain-test (defaults)", "plain-test", {}) in ablation.all_rows()
        monkeypatch.setattr(ablation, "in_fresh_process", fake_run)
        result = ablation.run_ablation(
            "m", [3], out_dir=tmp_path, tasks=None, limit=None, rows=["plain-test (defaults)"]
        )
        assert [r["label"] for r in result["rows"]] == ["FP", "plain-test (defaults)"]
        assert "| 3 | plain-test (defaults) |" in (tmp_path / "ablation.md").read_text()
    finally:
        unregister_method("plain-test")
