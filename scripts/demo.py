"""The main job end to end through the service: start ``rsavq serve`` (SQLite + embedded broker, one
worker), create an API key, submit the bundled model at 3 bits over HTTP (the budget whose
measured perplexity stays near 1.5x full precision: README, "Quality"), follow its progress, download
and verify the packed checkpoint, print the metrics, and generate a sentence from it
through the OpenAI-compatible ``POST /v1/completions`` (streamed by the generation server).

Usage: python scripts/demo.py [--model smollm2-135m] [--bits 3] [--data-dir runs/demo-service]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
from httpx_sse import connect_sse

from service.cli.local import create_key, fail_leftover_jobs, start_server, stop_server
from service.cli.progress import JobEvents
from service.client import Client


def stream_completion(url: str, key: str, model: str, prompt: str, say: Callable[[str], object]) -> None:
    """Print a completion as its server-sent events arrive, then the decode rate the client saw."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": 24,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started, usage = time.monotonic(), None
    headers = {"Authorization": f"Bearer {key}"}
    with (
        httpx.Client(timeout=600) as http,
        connect_sse(http, "POST", f"{url}/v1/completions", json=body, headers=headers) as source,
    ):
        if source.response.status_code != 200:
            say(f"\n{source.response.status_code}: {source.response.read().decode()}\n")
            return
        for event in source.iter_sse():
            if event.data == "[DONE]":
                break
            chunk = json.loads(event.data)
            usage = chunk.get("usage") or usage
            if chunk["choices"]:
                say(chunk["choices"][0]["text"])
                sys.stdout.flush()
    if usage:
        say(f"\n({usage['completion_tokens']} tokens in {time.monotonic() - started:.1f} s, model load included)\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bits", type=float, default=3.0)
    parser.add_argument("--data-dir", default="runs/demo-service")
    parser.add_argument("--port", type=int, default=8731)
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--options", default="{}", help="JSON job options, e.g. '{\"calib_samples\": 8}'")
    args = parser.parse_args()
    say = sys.stdout.write
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    for job_id in fail_leftover_jobs(data_dir):
        say(f"job {job_id}, left running by an interrupted earlier demo: marked failed\n")

    say(f"$ rsavq serve --port {args.port} --data-dir {data_dir}\n")
    server = start_server(data_dir, args.port)
    try:
        key = create_key(data_dir, "demo")
        say(f"$ rsavq keys create demo  -> {key[:12]}…\n")
        client = Client(f"http://127.0.0.1:{args.port}", key)
        options = json.loads(args.options)
        job = client.submit(args.model, args.bits, "rsavq", options, idempotency_key=uuid.uuid4().hex)
        say(f"POST /v1/jobs -> 202, job {job['id']} ({job['status']})\n")
        started = time.monotonic()
        events = JobEvents()
        job = client.wait(job["id"], poll=1.0, on_event=events)
        events.close()
        if job["status"] != "succeeded":
            say(f"job {job['status']}: {job['error']}\n")
            return 1
        tar = client.download(job["id"], data_dir / f"rsavq-{job['id']}.tar")
        from service.artifacts import extract

        extract(tar, data_dir / f"rsavq-{job['id']}")
        metrics = client.metrics(job["id"])
        fp, q = metrics["fp"]["perplexity"], metrics["quantized"]["perplexity"]
        say(f"\njob wall time:        {time.monotonic() - started:.0f} s\n")
        say(f"protocol:             {fp['protocol']} ({fp['windows']} windows, {fp['tokens']} tokens)\n")
        say(f"FP perplexity:        {fp['ppl']:.2f}\n")
        say(f"RSAVQ perplexity:     {q['ppl']:.2f}\n")
        say(
            f"effective bpw:        {metrics['bits']['quantized']['bpw']:.4f} (quantized layers), "
            f"{metrics['bits']['all_bpw']:.3f} (all parameters, the rest fp16)\n"
        )
        timings = metrics["timings"]
        stats = "cached" if metrics["stats_cached"] else f"{timings.get('statistics', 0.0):.0f} s"
        say(
            f"quantize time:        {timings['total']:.0f} s (statistics {stats}); "
            f"worker peak RSS {metrics['peak_rss_gb']:.2f} GB\n"
        )
        say(
            f"artifact:             {tar} ({metrics['artifact']['bytes'] / 2**20:.1f} MiB, "
            f"sha256 {metrics['artifact']['sha256'][:16]}… verified)\n"
        )
        say(f"POST /v1/completions (model {job['id']}, greedy, streamed):\nRSAVQ > {args.prompt}")
        stream_completion(f"http://127.0.0.1:{args.port}", key, job["id"], args.prompt, say)
    finally:
        stop_server(server)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
