"""SIGTERM to ``rsavq serve`` while a job runs: every process it started stops, the job is left to
the reaper (its lease runs out), nothing is orphaned."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from service.api.auth import create_key
from service.db import session_factory
from tests.service.conftest import auth
from tests.timing import patience, wait_until

# A job that is sure to be running for minutes: a thousand k-means rounds per layer.
LONG_JOB = {
    "model_id": "smollm2-135m",
    "bits": 2,
    "options": {"calib_samples": 2, "calib_len": 64, "kmeans_iters": 1000},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate, timeout: float, what: str, log: Path) -> None:
    wait_until(predicate, what, timeout=timeout, interval=0.5, logs=lambda: log.read_text(errors="replace"))


def test_sigterm_to_serve_stops_every_child_even_mid_job(tmp_path: Path) -> None:
    port, data = _free_port(), tmp_path / "data"
    data.mkdir()
    log = data / "serve.log"
    env = {**os.environ, "RSAVQ_LEASE_SECONDS": "5"}
    with open(log, "wb") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--data-dir", str(data)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        _wait(healthy, 120, "rsavq serve to answer", log)
        with session_factory(f"sqlite:///{data / 'rsavq.db'}")() as session:
            key = create_key(session, "t")
        job = httpx.post(url + "/v1/jobs", json=LONG_JOB, headers=auth(key)).json()
        status = lambda: httpx.get(f"{url}/v1/jobs/{job['id']}", headers=auth(key)).json()  # noqa: E731
        _wait(lambda: status()["status"] == "running", 180, "the job to run", log)
        tree = psutil.Process(serve.pid).children(recursive=True)
        assert len(tree) >= 3, tree  # the Celery worker, its pool process, the generation server

        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=patience(60))
        _, alive = psutil.wait_procs(tree, timeout=patience(30))
        assert not alive, [(p.pid, p.cmdline()[:4]) for p in alive]
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
    with session_factory(f"sqlite:///{data / 'rsavq.db'}")() as session:
        from service.db import Job

        row = session.get(Job, job["id"])
        assert row is not None
        assert row.status in ("running", "queued"), (row.status, row.error)  # for the reaper


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RSAVQ_DATABASE_URL", "RSAVQ_BROKER_URL", "RSAVQ_ARTIFACT_DIR", "RSAVQ_GENERATION_URL"):
        monkeypatch.delenv(name, raising=False)
