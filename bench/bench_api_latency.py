"""API latency of ``GET /v1/jobs/{id}`` under a fixed request rate, on loopback.

Starts ``uvicorn service.api.app:create_app`` (embedded default: SQLite + SQLite broker, unless
RSAVQ_DATABASE_URL / RSAVQ_BROKER_URL say otherwise), creates a key and a job, then sends requests
open-loop at --rate per second for --seconds (each request is scheduled at its tick, whether or
not earlier ones have returned, so a slow server shows up as latency rather than a lower rate).
Latency is measured from the scheduled tick, which counts queueing delay (no coordinated omission).

Usage: python bench/bench_api_latency.py [--rate 200] [--seconds 30] [--workers 1]
                                        [--out bench/results/api_latency.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from rsavq_core.runs.replay import parse_args, record


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def drive(url: str, headers: dict[str, str], rate: float, seconds: float) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(headers=headers, timeout=10, limits=limits) as client:

        async def one(scheduled: float) -> None:
            nonlocal errors
            try:
                r = await client.get(url)
                if r.status_code != 200:
                    errors += 1
            except httpx.HTTPError:
                errors += 1
            latencies.append(time.perf_counter() - scheduled)

        tasks = []
        start = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            tick = start + i / rate
            delay = tick - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(tick)))
        await asyncio.gather(*tasks)
    return latencies, errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--port", type=int, default=8799)
    parser.add_argument("--out", default="bench/results/api_latency.json")
    args = parse_args(parser, output="out")
    origin = record(args)

    from service.api.auth import create_key
    from service.db import session_factory
    from service.migrate import upgrade
    from service.settings import Settings

    data_dir = Path(tempfile.mkdtemp(prefix="rsavq-bench-"))
    settings = Settings.from_env(data_dir)
    settings.ensure_dirs()
    upgrade(settings.database_url)
    with session_factory(settings.database_url)() as session:
        key = create_key(session, "bench")
    env = {**os.environ, **settings.to_env()}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "service.api.app:create_app",
            "--factory",
            "--port",
            str(args.port),
            "--workers",
            str(args.workers),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env=env,
    )
    base = f"http://127.0.0.1:{args.port}"
    headers = {"Authorization": f"Bearer {key}"}
    try:
        for _ in range(120):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        job = httpx.post(base + "/v1/jobs", json={"model_id": "smollm2-135m", "bits": 2}, headers=headers).json()
        url = f"{base}/v1/jobs/{job['id']}"
        asyncio.run(drive(url, headers, args.rate, 2))  # warm-up: connections, caches
        latencies, errors = asyncio.run(drive(url, headers, args.rate, args.seconds))
    finally:
        server.terminate()
        server.wait(timeout=30)
    ms = [x * 1000 for x in latencies]
    result = {
        "endpoint": "GET /v1/jobs/{id}",
        "rate_rps": args.rate,
        "seconds": args.seconds,
        "requests": len(ms),
        "errors": errors,
        "uvicorn_workers": args.workers,
        "database": settings.database_url.split(":")[0],
        "broker": settings.broker_url.split(":")[0],
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms),
        "mean_ms": statistics.fmean(ms),
        "cpu_count": os.cpu_count(),
        "provenance": origin,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    sys.stdout.write(
        "| endpoint | rate | requests | errors | p50 ms | p90 ms | p99 ms | max ms |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    sys.stdout.write(
        f"| {result['endpoint']} | {args.rate:g}/s | {len(ms)} | {errors} | {result['p50_ms']:.1f} | "
        f"{result['p90_ms']:.1f} | {result['p99_ms']:.1f} | {result['max_ms']:.1f} |\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
