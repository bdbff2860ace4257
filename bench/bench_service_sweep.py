"""A budget sweep measured through the job service, and optionally a job calibrated on uploaded text.

Starts ``rsavq serve`` (SQLite + embedded broker, one worker), creates a key, submits one sweep
(``POST /v1/sweeps``, one job per budget, the default method and settings unless ``--options``),
follows every job, and prints the sweep's table (all-in bpw, artifact bytes, perplexity, zero-shot)
as the API reports it. With ``--dataset-text FILE`` the sweep calibrates on your own text: it is
uploaded (``POST /v1/datasets``, one document per line), its last ``--holdout`` share of documents
as a separate evaluation text, and every job calibrates on the rest and is evaluated on both the
bundled and the held-out text; the JSON keeps what each job's metrics say it used (name, sha256).
Writes JSON and an SVG chart of perplexity against artifact size.

    python bench/bench_service_sweep.py --model smollm2-135m --bits 2 3 4 --options '{"preset": "fast"}' \\
        --evaluation '{"zero_shot": "all", "limit": 25}' --dataset-text .../standard_cal_data/c4.utf8 \\
        --json bench/results/service/sweep-smollm2.json --svg docs/sweep-smollm2.svg
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from rsavq_core.runs.replay import parse_args, record
from service.cli.local import create_key, fail_leftover_jobs, start_server, stop_server
from service.cli.remote import sweep_table
from service.client import Client


def split_documents(path: Path, holdout: float) -> tuple[bytes, bytes]:
    """One document per non-empty line, repeats dropped (web text repeats pages, and a held-out
    document must not be in the calibration text); the last ``holdout`` share held out. Both as JSONL."""
    docs = list(dict.fromkeys(line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()))
    cut = max(1, min(len(docs) - 1, round(len(docs) * (1 - holdout))))

    def jsonl(rows: list[str]) -> bytes:
        return "".join(json.dumps({"text": row}) + "\n" for row in rows).encode()

    return jsonl(docs[:cut]), jsonl(docs[cut:])


def upload_texts(client: Client, text: Path, holdout: float) -> dict[str, Any]:
    """Upload ``text`` as a calibration dataset and its last documents as a held-out one."""
    calib_bytes, eval_bytes = split_documents(text, holdout)
    return {
        "calibration": client.upload_dataset(f"{text.stem}-calibration", calib_bytes, "application/jsonl"),
        "evaluation": client.upload_dataset(f"{text.stem}-holdout", eval_bytes, "application/jsonl"),
    }


def svg_chart(rows: list[dict[str, Any]], fp_ppl: float | None, title: str) -> str:
    """Perplexity (log axis) against artifact MB, one labelled point per budget; FP as a dashed line."""
    points = [r for r in rows if r["perplexity"] is not None and r["artifact_bytes"] is not None]
    if not points:
        return ""
    w, h, pad = 640, 360, 56
    xs = [r["artifact_bytes"] / 1e6 for r in points]
    ys = [math.log10(v) for v in [r["perplexity"] for r in points] + ([fp_ppl] if fp_ppl else [])]
    spread = max(max(xs) - min(xs), max(xs) * 0.1)
    x0, x1 = max(0.0, min(xs) - 0.25 * spread), max(xs) + 0.25 * spread
    y0, y1 = min(ys) - 0.1, max(ys) + 0.1

    def px(x: float) -> float:
        return pad + (x - x0) / (x1 - x0) * (w - 2 * pad)

    def py(y: float) -> float:
        return h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
        f'<line x1="{pad}" y1="{pad / 2}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
        f'<text x="{w / 2}" y="{h - 16}" text-anchor="middle">artifact size (MB, the whole checkpoint)</text>',
        f'<text x="16" y="{h / 2}" transform="rotate(-90 16 {h / 2})" text-anchor="middle">perplexity (log)</text>',
    ]
    for tick in (10, 20, 30, 50, 100, 200, 500, 1000):
        if y0 <= math.log10(tick) <= y1:
            out.append(f'<text x="{pad - 6}" y="{py(math.log10(tick)) + 4}" text-anchor="end">{tick}</text>')
    step = 10 ** math.floor(math.log10(x1 - x0))
    step = step / 2 if (x1 - x0) / step < 4 else step
    for i in range(math.ceil(x0 / step), math.floor(x1 / step) + 1):
        out.append(f'<text x="{px(i * step)}" y="{h - pad + 16}" text-anchor="middle">{i * step:g}</text>')
    if fp_ppl:
        y = py(math.log10(fp_ppl))
        out.append(f'<line x1="{pad}" y1="{y}" x2="{w - pad}" y2="{y}" stroke="gray" stroke-dasharray="5,4"/>')
        out.append(f'<text x="{w - pad}" y="{y - 5}" text-anchor="end" fill="gray">FP {fp_ppl:.2f}</text>')
    coords = [(px(x), py(math.log10(r["perplexity"]))) for x, r in zip(xs, points, strict=True)]
    out.append('<polyline fill="none" stroke="#1f77b4" points="' + " ".join(f"{a},{b}" for a, b in coords) + '"/>')
    for (a, b), r in zip(coords, points, strict=True):
        out.append(f'<circle cx="{a}" cy="{b}" r="4" fill="#1f77b4"/>')
        label = f"{r['bits']:g} bit: {r['perplexity']:.2f} @ {r['effective_bpw']:.3f} bpw"
        left = a > w / 2  # labels on the right half go left of their point, so none is cut off
        anchor, dx = ("end", -8) if left else ("start", 8)
        out.append(f'<text x="{a + dx}" y="{b - 8}" text-anchor="{anchor}">{label}</text>')
    return "\n".join([*out, "</svg>\n"])


def write_chart(out: dict[str, Any], path: Path) -> None:
    first = next(iter(out["metrics"].values()), {})
    fp = ((first.get("fp") or {}).get("perplexity") or {}).get("ppl")
    calibrated = (out.get("datasets") or {}).get("calibration")
    on = f" · calibrated on {calibrated['name']}" if calibrated else ""
    title = f"{out['model']} · {out.get('method', 'rsavq')} {out.get('options', '')}{on} · wiki-holdout-512"
    path.write_text(svg_chart(out["sweep"]["rows"], fp, title))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    ap.add_argument("--method", default="rsavq")
    ap.add_argument("--options", default="{}", help="JSON job options every budget shares")
    ap.add_argument("--evaluation", default='{"zero_shot": "all", "limit": 50}', help="JSON options.evaluation")
    ap.add_argument("--dataset-text", help="calibrate on this text (one document per line) instead of the bundled")
    ap.add_argument("--holdout", type=float, default=0.25, help="share of its documents held out for evaluation")
    ap.add_argument("--data-dir", default="runs/service-sweep")
    ap.add_argument("--port", type=int, default=8733)
    ap.add_argument("--json", required=True)
    ap.add_argument("--svg")
    ap.add_argument("--replot", action="store_true", help="only redraw --svg from an earlier run's --json")
    args = parse_args(ap, argv, output="json")
    if args.replot:
        out = json.loads(Path(args.json).read_text())
        write_chart(out, Path(args.svg))
        return out
    evaluation = json.loads(args.evaluation)
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    fail_leftover_jobs(data_dir)
    server = start_server(data_dir, args.port)
    out: dict[str, Any] = {
        "model": args.model,
        "method": args.method,
        "bits": args.bits,
        "options": args.options,
        "provenance": record(args),
    }
    try:
        client = Client(f"http://127.0.0.1:{args.port}", create_key(data_dir, "bench"), timeout=120)
        started = time.monotonic()
        options = {**json.loads(args.options), "evaluation": evaluation}
        if args.dataset_text:
            out["datasets"] = upload_texts(client, Path(args.dataset_text), args.holdout)
            options["calibration"] = {"dataset": out["datasets"]["calibration"]["id"]}
            options["evaluation"] = {**evaluation, "datasets": [out["datasets"]["evaluation"]["id"]]}
        sweep = client.sweep(args.model, args.bits, args.method, options, name=f"{args.model}-sweep")
        for row in sweep["rows"]:
            client.wait(row["job_id"], poll=2.0)
        out["sweep"] = client.get_sweep(sweep["id"])
        out["sweep_wall_s"] = time.monotonic() - started
        out["metrics"] = {r["job_id"]: client.metrics(r["job_id"]) for r in out["sweep"]["rows"] if r["job_id"]}
        sys.stdout.write(sweep_table(out["sweep"]) + f"sweep wall time {out['sweep_wall_s']:.0f} s\n")
    finally:
        stop_server(server)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.svg and out.get("sweep"):
        write_chart(out, Path(args.svg))
    return out


if __name__ == "__main__":
    main()
