"""An embedded service on this machine for scripts (``make demo``, the service benchmarks): start
``rsavq serve`` in its own process group, wait until it is healthy, create a key, stop it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
from sqlalchemy import select


def fail_leftover_jobs(data_dir: Path) -> list[str]:
    """Jobs an interrupted earlier script left queued or running in this data dir: failed now, so the
    reaper does not hand them to the worker ahead of (or beside) this run's jobs."""
    from service import jobs as machine
    from service.db import Job, session_factory
    from service.migrate import upgrade
    from service.settings import Settings

    settings = Settings.from_env(data_dir)
    if not settings.database_url.startswith("sqlite:///") or not Path(settings.database_url[10:]).is_file():
        return []
    upgrade(settings.database_url)  # an older run's database: the schema this code reads
    with session_factory(settings.database_url)() as session:
        left = list(session.scalars(select(Job.id).where(Job.status.in_(machine.ACTIVE))))
        for job_id in left:
            machine.fail_unclaimed(session, job_id, "abandoned by an interrupted earlier run")
    return left


def start_server(data_dir: Path, port: int, timeout_s: float = 120.0) -> subprocess.Popen[bytes]:
    """``rsavq serve`` on 127.0.0.1:port, its output appended to ``data_dir/serve.log``."""
    log = open(data_dir / "serve.log", "ab")  # lives as long as the server
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--data-dir", str(data_dir)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"rsavq serve exited; see {data_dir / 'serve.log'}")
        time.sleep(0.5)
    stop_server(server)
    raise SystemExit(f"rsavq serve did not become healthy in {timeout_s:.0f} s")


def stop_server(server: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """SIGTERM to the whole group (API, worker, generation server), then wait."""
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=timeout_s)


def create_key(data_dir: Path, prefix: str) -> str:
    """A new API key (its own tenant) in this data dir, as ``rsavq keys create`` prints it."""
    created = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "keys",
            "create",
            f"{prefix}-{uuid.uuid4().hex[:6]}",
            "--data-dir",
            str(data_dir),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return created.stdout.strip().splitlines()[-1]
