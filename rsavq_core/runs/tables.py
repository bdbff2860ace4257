"""Markdown tables from result JSON, so that no number in the README or ``docs/`` is typed by hand.

``scripts/results_tables.py`` writes them between markers in the documents; ``bench/`` scripts
print the same tables. Torch-free.
"""

from __future__ import annotations

from typing import Any


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def minutes(seconds: float | None) -> str:
    """``1234`` -> ``20 min 34 s``."""
    if seconds is None:
        return "–"
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60:02d} s" if whole >= 60 else f"{whole} s"


def machine_label(row: dict[str, Any]) -> str:
    """``AMD EPYC x2 (164 GFLOP/s)`` from a row's provenance."""
    m = (row.get("provenance") or {}).get("machine") or {}
    if not m:
        return "–"
    return f"{m.get('cpu')} x{m.get('cores')} ({m.get('fp32_gflops', 0):.0f} GFLOP/s)"


def commit_label(row: dict[str, Any]) -> str:
    p = row.get("provenance") or {}
    commit = p.get("commit")
    return "–" if not commit else f"`{commit[:8]}`" + (" (dirty)" if p.get("dirty") else "")


def perplexity(row: dict[str, Any]) -> float | None:
    return ((row.get("eval") or row).get("perplexity") or {}).get("ppl")


def zero_shot(row: dict[str, Any]) -> float | None:
    return ((row.get("eval") or row).get("zero_shot") or {}).get("average")


def quality_table(rows: list[dict[str, Any]]) -> str:
    """Rows of ``bench/bench_quality.py`` (one "FP" row among them for the × FP column) as markdown."""
    fp = next((perplexity(r) for r in rows if r.get("label") == "FP"), None)
    head = (
        "| run | bits (target) | bpw, quantized layers | bpw, whole file | perplexity | × FP | zero-shot | "
        "time | peak RSS | machine | commit |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        ppl, zs = perplexity(r), zero_shot(r)
        bits = r.get("bits") or {}
        quantized = (bits.get("quantized") or {}).get("bpw")
        ratio = fmt(ppl / fp) if ppl is not None and fp and r.get("label") != "FP" else "–"
        target = (r.get("config") or {}).get("bits")
        peak = "–" if r.get("peak_rss_gb") is None else f"{r['peak_rss_gb']:.2f} GiB"
        lines.append(
            f"| {r.get('label')} | {fmt(target, 0) if target is not None else '16'} | "
            f"{fmt(quantized, 4) if quantized is not None else '16 (fp16)'} | {fmt(bits.get('all_bpw'), 3)} | "
            f"{fmt(ppl)} | {ratio} | {fmt(zs * 100 if zs is not None else None, 1)} | "
            f"{minutes(r.get('wall_s'))} | {peak} | {machine_label(r)} | {commit_label(r)} |"
        )
    return head + "\n".join(lines) + "\n"
