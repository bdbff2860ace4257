"""One job through the service on this machine, for a model bigger than its memory in float32.

Starts ``rsavq serve`` (SQLite + embedded broker, one worker) with ``RSAVQ_ALLOW_LOCAL_MODELS=true``,
submits a local checkpoint over HTTP, follows it to the end and records what the service reported:
the job's status, timings, the worker's peak RSS, perplexities, the artifact; beside them the
pre-flight estimate of the streamed run the worker makes and of the whole-model load it replaced,
against this machine's memory. The checkpoint of the issue is the Llama-3.1-8B-shaped one of
``bench/random_checkpoint.py`` (random weights: its perplexities only show the evaluation ran).

    python bench/random_checkpoint.py --shape llama-3.1-8b --out /tmp/llama8b
    python bench/bench_service_job.py --model /tmp/llama8b --out bench/results/service_8b.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

DEFAULT_OPTIONS = {"group_size": 128, "calib_samples": 8, "calib_len": 256, "evaluation": {"windows": 2}}


def estimates(model: str, method: str, bits: float, options: dict[str, Any]) -> dict[str, Any]:
    """The streamed and the whole-model estimate of this job (GiB) against this machine's memory."""
    from rsavq_core.models.memory import GIB, estimate_job_memory
    from service.api.schemas.jobs import JobRequest

    request = {"model_id": model, "bits": bits, "method": method, "options": options}
    cfg = JobRequest.model_validate(request).quant_config()
    streamed = estimate_job_memory(Path(model), cfg, streamed=True)
    whole = estimate_job_memory(Path(model), cfg, streamed=False)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return {
        "host_memory_gb": host,
        "streamed_estimate_gb": streamed.total / GIB,
        "streamed_estimate": streamed.describe(),
        "whole_estimate_gb": whole.total / GIB,
        "whole_estimate": whole.describe(),
        "whole_would_be_refused": whole.total / GIB > host,
    }


def run_job(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    from service.cli.local import create_key, fail_leftover_jobs, start_server, stop_server
    from service.cli.progress import JobEvents
    from service.client import Client

    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    fail_leftover_jobs(data_dir)
    os.environ["RSAVQ_ALLOW_LOCAL_MODELS"] = "true"  # the server inherits it: local paths are accepted
    server = start_server(data_dir, args.port)
    try:
        client = Client(f"http://127.0.0.1:{args.port}", create_key(data_dir, "bench"), timeout=120)
        started = time.monotonic()
        job = client.submit(args.model, args.bits, args.method, options, idempotency_key=uuid.uuid4().hex)
        events = JobEvents()
        job = client.wait(job["id"], poll=5.0, on_event=events)
        events.close()
        wall = time.monotonic() - started
        metrics = client.metrics(job["id"]) if job["status"] == "succeeded" else {}
    finally:
        stop_server(server)
    return {"job": job, "wall_seconds": wall, "metrics": metrics}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/tmp/llama8b", help="a local checkpoint folder")
    parser.add_argument("--method", default="gptq")
    parser.add_argument("--bits", type=float, default=4.0)
    parser.add_argument("--options", default=json.dumps(DEFAULT_OPTIONS), help="the job's options, JSON")
    parser.add_argument("--data-dir", default="/tmp/bench-service-job")
    parser.add_argument("--port", type=int, default=8741)
    parser.add_argument("--out", default="bench/results/service_8b.json")
    args = parser.parse_args()
    from rsavq_core.runs.provenance import provenance
    from rsavq_core.runs.replay import recorded_args

    options = json.loads(args.options)
    origin = {**provenance(), "args": recorded_args(args)}  # before the job: the code the worker runs
    row: dict[str, Any] = {"model": args.model, "method": args.method, "bits": args.bits, "options": options}
    row.update(estimates(args.model, args.method, args.bits, options))
    row.update(run_job(args, options))
    row["provenance"] = origin
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1, default=str) + "\n")
    metrics, job = row["metrics"], row["job"]
    ppl = {k: (metrics.get(k) or {}).get("perplexity", {}).get("ppl") for k in ("fp", "quantized")}
    sys.stdout.write(
        f"job {job['id']} {job['status']} in {row['wall_seconds']:.0f} s; worker peak RSS "
        f"{metrics.get('peak_rss_gb', float('nan')):.2f} GiB; streamed estimate {row['streamed_estimate_gb']:.2f} GiB; "
        f"whole-model estimate {row['whole_estimate_gb']:.2f} GiB on a {row['host_memory_gb']:.1f} GiB machine; "
        f"perplexity fp {ppl['fp']} quantized {ppl['quantized']}\n"
    )
    return 0 if job["status"] == "succeeded" else 1


if __name__ == "__main__":
    raise SystemExit(main())
