"""The library on its own: quantize, eval, generate, ablation (no server involved)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rsavq_core.config.quant_config import ZERO_SHOT_TASKS
from service.cli.flags import (
    add_config_flags,
    apply_placement_flags,
    config_from_args,
    placement_flags,
    placement_from_args,
)
from service.cli.progress import StageBars


def _evaluation(args: argparse.Namespace, *, ppl: bool) -> dict[str, Any]:
    from rsavq_core.data.text_files import read_text_file
    from rsavq_core.runs.summaries import parse_tasks

    texts = [read_text_file(f) for f in args.eval_file or []]
    return {
        "ppl": ppl,
        "tasks": parse_tasks(args.tasks),
        "limit": args.limit,
        "perplexity_windows": args.windows,
        "texts": texts,
    }


def cmd_quantize(args: argparse.Namespace) -> dict[str, Any]:
    from rsavq_core.runs.summaries import quantize_summary

    cfg = config_from_args(args)  # validated before anything heavy
    if args.dry_run:
        return _dry_run(args, cfg)
    bars = StageBars(not args.quiet)
    try:
        from rsavq_core.data.text_files import read_text_file

        return quantize_summary(
            args.model,
            cfg,
            out=args.out,
            evaluation=_evaluation(args, ppl=args.ppl),
            per_layer=args.per_layer,
            progress=bars,
            calibration_text=read_text_file(args.calib_file) if args.calib_file else None,
            allow_overlap=args.allow_overlap,
            allow_partial=args.allow_partial,
            placement=placement_from_args(args),
        )
    finally:
        bars.close()


def _dry_run(args: argparse.Namespace, cfg: Any) -> dict[str, Any]:
    """What ``quantize`` would need, from the checkpoint's headers and config: nothing is run."""
    from rsavq_core.models.memory import GIB, block_shapes, estimate_job_memory, statistics_store_bytes
    from rsavq_core.models.resolve import resolve_model

    placement = placement_from_args(args)
    folder = resolve_model(args.model)
    streamed = placement.streams(cfg)
    blocks = block_shapes(folder)
    estimate = estimate_job_memory(
        folder,
        cfg,
        streamed=streamed,
        device=placement.device.type,
        activation_budget=placement.activation_budget_bytes,
    )
    return {
        "model": args.model,
        "folder": str(folder),
        "config": cfg.to_dict(),
        "device": str(placement.device),
        "streamed": streamed,
        "parameters": estimate.parameters,
        "host_gib": round(estimate.total / GIB, 3),
        "host_terms_gib": {k: round(v / GIB, 3) for k, v in estimate.terms.items()},
        "device_gib": round(estimate.device_total / GIB, 3),
        "device_terms_gib": {k: round(v / GIB, 3) for k, v in estimate.device_terms.items()},
        "peak_phase": estimate.phase,
        # what the statistics cache would take; Hessian-only runs past RSAVQ_STATS_CACHE_GB store none
        "statistics_store_gib": round(statistics_store_bytes(blocks.linears, cfg) / GIB, 3),
        # what would stay in float; a share under 90 % is refused without --allow-partial
        "coverage": blocks.coverage.report(),
        "summary": estimate.describe(),
    }


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from rsavq_core.runs.summaries import evaluate_summary

    apply_placement_flags(args)
    bars = StageBars(not args.quiet)
    try:
        return evaluate_summary(args.target, _evaluation(args, ppl=args.ppl or not args.tasks), progress=bars)
    finally:
        bars.close()


def cmd_generate(args: argparse.Namespace) -> str:
    from rsavq_core.runtime.generation import generate_text
    from rsavq_core.runtime.loading import load_any

    model, tokenizer, _ = load_any(args.target)
    return generate_text(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )


def cmd_ablation(args: argparse.Namespace) -> dict[str, Any]:
    from rsavq_core.runs.ablation import run_ablation

    apply_placement_flags(args)
    return run_ablation(
        args.model,
        args.bits,
        out_dir=Path(args.out),
        tasks=args.tasks,
        limit=args.limit,
        windows=args.windows,
        calib_samples=args.calib_samples,
        rows=args.rows,
    )


def _evaluation_flags(p: argparse.ArgumentParser, *, limit: int | None = None) -> None:
    p.add_argument("--ppl", action="store_true", help="perplexity by the wiki-holdout-512 protocol")
    p.add_argument("--tasks", help=f"comma-separated zero-shot tasks, or 'all' ({','.join(ZERO_SHOT_TASKS)})")
    p.add_argument("--limit", type=int, default=limit, help="first N items per zero-shot task (labelled in the output)")
    p.add_argument("--windows", type=int, help="perplexity windows (default 64; others are labelled)")
    p.add_argument(
        "--eval-file",
        action="append",
        metavar="FILE",
        help="also the perplexity on your own text (plain text, or JSONL with a 'text' field); repeatable",
    )


def _output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the library does")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    q = sub.add_parser("quantize", help="quantize a model with the library and print a JSON summary")
    q.add_argument("model", help="local folder, Hugging Face id already cached, or alias (smollm2-135m)")
    q.add_argument("--out", help="write the packed checkpoint to this folder")
    q.add_argument("--per-layer", action="store_true", help="include per-layer reports in the JSON")
    q.add_argument("--calib-file", metavar="FILE", help="calibrate on your own text (plain text, or JSONL with 'text')")
    q.add_argument(
        "--allow-overlap",
        action="store_true",
        help="evaluate on text that shares documents with the calibration text (refused otherwise)",
    )
    q.add_argument(
        "--allow-partial",
        action="store_true",
        help="quantize a model whose linears hold under 90%% of its blocks' weights (the rest stays in float)",
    )
    q.add_argument("--dry-run", action="store_true", help="print the run's memory estimate (host and device) and stop")
    add_config_flags(q)
    placement_flags(q)
    _evaluation_flags(q)
    _output_flags(q)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="evaluate a packed checkpoint or a float model; prints JSON")
    e.add_argument("target", help="a packed checkpoint folder or a model id")
    placement_flags(e)
    _evaluation_flags(e)
    _output_flags(e)
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate text from a packed checkpoint or a float model")
    g.add_argument("target", help="a packed checkpoint folder or a model id")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    _output_flags(g)
    g.set_defaults(func=cmd_generate)

    a = sub.add_parser("ablation", help="the paper's ablation side by side; writes ablation.md and .json")
    a.add_argument("model")
    a.add_argument("--bits", type=float, nargs="+", default=[2.0, 3.0])
    a.add_argument("--out", default="runs/ablation")
    a.add_argument("--rows", nargs="+", metavar="LABEL", help="only these rows, e.g. 'RTN g64' (default: all)")
    a.add_argument("--calib-samples", type=int)
    placement_flags(a)
    _evaluation_flags(a, limit=100)
    a.set_defaults(tasks="all")
    _output_flags(a)
    a.set_defaults(func=cmd_ablation)
