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
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
from httpx_sse import connect_sse

from service.cli.progress import JobEvents
from service.client import Client


def fail_leftover_jobs(data_dir: Path) -> list[str]:
    """Jobs an interrupted earlier demo left queued or running in this data dir: failed now, so the
    reaper does not hand them to the worker ahead of (or beside) this run's job."""
    from sqlalchemy import select

    from service import jobs as machine
    from service.db import Job, session_factory
    from service.migrate import upgrade
    from service.settings import Settings

    settings = Settings.from_env(data_dir)
    if not settings.database_url.startswith("sqlite:///") or not Path(settings.database_url[10:]).is_file():
        return []
    upgrade(settings.database_url)  # an older demo's database: the schema this code reads
    with session_factory(settings.database_url)() as session:
        left = list(session.scalars(select(Job.id).where(Job.status.in_((machine.QUEUED, machine.RUNNING)))))
        for job_id in left:
            machine.fail_unclaimed(session, job_id, "abandoned by an interrupted earlier demo")
    return left


def start_server(data_dir: Path, port: int) -> subprocess.Popen:  # type: ignore[type-arg]
    log = open(data_dir / "serve.log", "ab")  # noqa: SIM115 - lives as long as the server
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--data-dir", str(data_dir)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"rsavq serve exited; see {data_dir / 'serve.log'}")
        time.sleep(0.5)
    raise SystemExit("rsavq serve did not become healthy in 120 s")


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
        created = subprocess.run(
            [
                sys.executable,
                "-m",
                "service.cli",
                "keys",
                "create",
                f"demo-{uuid.uuid4().hex[:6]}",
                "--data-dir",
                str(data_dir),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        key = created.stdout.strip().splitlines()[-1]
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
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
