"""The ``rsavq`` command line: quantize, eval, generate, ablation.

Results go to stdout as JSON (or text for ``generate``); progress bars and logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from rsavq_core.config import METHODS, ZERO_SHOT_TASKS, QuantConfig
from rsavq_core.errors import RSAVQError

log = logging.getLogger("rsavq")


class ProgressBar:
    """Stage-aware progress on stderr: 'stage i/N [elapsed<ETA]' via tqdm, one bar per stage."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled, self.stage, self.bar = enabled, None, None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=stage, unit="step", file=sys.stderr, dynamic_ncols=True)
        assert self.bar is not None
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.stage = None, None


def _config_from_args(args: argparse.Namespace) -> QuantConfig:
    overrides: dict[str, Any] = {"bits": args.bits}
    for name in (
        "vector_len",
        "n_pq",
        "n_groups",
        "lam",
        "lam_scale",
        "allocation",
        "sensitivity",
        "metric",
        "assign",
        "kmeans_iters",
        "kmeans_fit_points",
        "fisher",
        "damping",
        "calib_samples",
        "calib_len",
        "group_size",
        "seed",
        "budget",
    ):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if args.compensate is not None:
        overrides["compensate"] = args.compensate
    return QuantConfig.for_method(args.method, **overrides)


def evaluate(
    model: Any,
    tokenizer: Any,
    *,
    ppl: bool,
    tasks: str | None,
    limit: int | None,
    windows: int | None,
    progress: ProgressBar,
) -> dict[str, Any]:
    """``evaluate_model`` with the CLI's comma-separated task list and progress bar."""
    from rsavq_core.evaluation import evaluate_model

    names = None
    if tasks:
        names = list(ZERO_SHOT_TASKS) if tasks == "all" else [t.strip() for t in tasks.split(",") if t.strip()]
    out = evaluate_model(
        model, tokenizer, perplexity_windows=windows, ppl=ppl, tasks=names, limit=limit, progress=progress
    )
    progress.close()
    return out


def cmd_quantize(args: argparse.Namespace) -> dict[str, Any]:
    from rsavq_core.bitcount import model_bits
    from rsavq_core.pipeline import peak_rss_gb, quantize_model, save_result

    cfg = _config_from_args(args)  # validated before anything heavy
    progress = ProgressBar(not args.quiet)
    result = quantize_model(args.model, cfg, progress=progress)
    progress.close()
    summary: dict[str, Any] = {
        "model": args.model,
        "method": cfg.method,
        "config": cfg.to_dict(),
        "timings": result.timings,
        "stats_cached": result.stats_cached,
        "peak_rss_gb": result.peak_rss_gb,
        "bits": model_bits(result.layers, result.model),
    }
    if args.out:
        summary["out"] = str(save_result(result, Path(args.out)))
    if args.ppl or args.tasks:
        from rsavq_core.qlinear import quantize_in_place

        quantize_in_place(result.model, result.layers)
        summary["eval"] = evaluate(
            result.model,
            result.tokenizer,
            ppl=args.ppl,
            tasks=args.tasks,
            limit=args.limit,
            windows=args.windows,
            progress=progress,
        )
    summary["peak_rss_gb"] = peak_rss_gb()  # ru_maxrss is monotonic: this covers evaluation too
    if not args.per_layer:
        summary["bits"].pop("layers", None)
    else:
        summary["layers"] = result.reports
    return summary


def load_any(path_or_model: str) -> tuple[Any, Any, dict[str, Any]]:
    """A packed checkpoint (folder with rsavq.safetensors) or a float model id."""
    if (Path(path_or_model) / "rsavq.safetensors").is_file():
        from rsavq_core.qlinear import load_quantized_model

        model, tokenizer, artifact = load_quantized_model(path_or_model)
        return model, tokenizer, {"artifact": path_or_model, "method": artifact.metadata.get("method")}
    from rsavq_core.models import load_model

    model, tokenizer, folder = load_model(path_or_model)
    return model, tokenizer, {"model": path_or_model, "folder": str(folder)}


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    model, tokenizer, info = load_any(args.target)
    tasks = args.tasks if args.tasks else None
    ppl = args.ppl or not tasks
    return {
        **info,
        **evaluate(
            model,
            tokenizer,
            ppl=ppl,
            tasks=tasks,
            limit=args.limit,
            windows=args.windows,
            progress=ProgressBar(not args.quiet),
        ),
    }


def cmd_generate(args: argparse.Namespace) -> str:
    from rsavq_core.generation import generate_text

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
    from rsavq_core.ablation import run_ablation

    return run_ablation(
        args.model,
        args.bits,
        out_dir=Path(args.out),
        tasks=args.tasks,
        limit=args.limit,
        windows=args.windows,
        calib_samples=args.calib_samples,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rsavq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def evals(p: argparse.ArgumentParser) -> None:
        p.add_argument("--ppl", action="store_true", help="perplexity by the wiki-holdout-512 protocol")
        p.add_argument("--tasks", help=f"comma-separated zero-shot tasks, or 'all' ({','.join(ZERO_SHOT_TASKS)})")
        p.add_argument("--limit", type=int, help="first N items per zero-shot task (labelled in the output)")
        p.add_argument("--windows", type=int, help="perplexity windows (default 64; others are labelled)")

    q = sub.add_parser("quantize", help="quantize a model and print a JSON summary")
    q.add_argument("model", help="local folder, Hugging Face id already cached, or alias (smollm2-135m)")
    q.add_argument("--bits", type=float, required=True, help="target bits per weight (indices), 1..8")
    q.add_argument("--method", default="rsavq", choices=METHODS)
    q.add_argument("--out", help="write the packed checkpoint to this folder")
    for flag, typ in (
        ("--vector-len", int),
        ("--n-pq", int),
        ("--n-groups", int),
        ("--lam", float),
        ("--kmeans-iters", int),
        ("--kmeans-fit-points", int),
        ("--damping", float),
        ("--calib-samples", int),
        ("--calib-len", int),
        ("--group-size", int),
        ("--seed", int),
    ):
        q.add_argument(flag, type=typ)
    q.add_argument("--lam-scale", choices=["relative", "raw"])
    q.add_argument(
        "--budget",
        choices=["index", "effective"],
        help="what --bits counts: index bits (paper) or every stored bit incl. codebooks",
    )
    q.add_argument("--allocation", choices=["proportional", "additive", "uniform"])
    q.add_argument("--sensitivity", choices=["inverse", "direct"])
    q.add_argument("--metric", choices=["fisher_diag", "hessian", "euclidean"])
    q.add_argument("--assign", choices=["shifted", "paper"])
    q.add_argument("--fisher", choices=["exact", "kfac"])
    q.add_argument("--compensate", action=argparse.BooleanOptionalAction, default=None)
    q.add_argument("--per-layer", action="store_true", help="include per-layer reports in the JSON")
    evals(q)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="evaluate a packed checkpoint or a float model; prints JSON")
    e.add_argument("target")
    evals(e)
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate text from a packed checkpoint or a float model")
    g.add_argument("target")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)

    a = sub.add_parser("ablation", help="the paper's ablation side by side; writes ablation.md and .json")
    a.add_argument("model")
    a.add_argument("--bits", type=float, nargs="+", default=[2.0, 3.0])
    a.add_argument("--out", default="runs/ablation")
    a.add_argument("--tasks", default="all")
    a.add_argument("--limit", type=int, default=100)
    a.add_argument("--windows", type=int)
    a.add_argument("--calib-samples", type=int)
    a.set_defaults(func=cmd_ablation)

    for p in (q, e, g, a):
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("-v", "--verbose", action="store_true")
    return parser


def run_parsed(args: argparse.Namespace, *, verbose: bool) -> int:
    """Run a parsed command: its result to stdout (text or JSON), an RSAVQError as exit code 2."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        result = args.func(args)
    except RSAVQError as exc:
        sys.stderr.write(f"rsavq: error: {exc}\n")
        return 2
    if result != "":  # a command that only has side effects (a server) prints nothing
        sys.stdout.write(result if isinstance(result, str) else json.dumps(result, indent=2, default=str))
        sys.stdout.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_parsed(args, verbose=args.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
