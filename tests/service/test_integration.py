"""The service against real PostgreSQL and Redis, with real Celery worker processes.

Jobs run on the bundled SmolLM2 with fast configurations of real jobs (few, short calibration
windows; two perplexity windows). Fault tests kill workers with SIGKILL and restart Redis.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from service.db import Job, JobEvent
from service.settings import Settings
from tests.service.conftest import auth
from tests.timing import wait_until

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)
# Every knob a real RSAVQ job has, scaled down: 4 calibration windows of 128 tokens.
RSAVQ_FAST = {
    "calib_samples": 4,
    "calib_len": 128,
    "kmeans_iters": 2,
    "kmeans_fit_points": 1024,
    "block_finetune_steps": 4,
    "evaluation": {"perplexity": True, "windows": 2},
}
# RTN needs no calibration: these jobs spend their time in the per-layer loop the fault tests interrupt.
RTN_JOB = {
    "model_id": "smollm2-135m",
    "bits": 4,
    "method": "rtn",
    "options": {"evaluation": {"perplexity": True, "windows": 2}},
}


@pytest.fixture
def dist_settings(tmp_path: Path, pg_url: str, redis_url: str) -> Iterator[Settings]:
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    base = Settings.from_env(tmp_path / "data")
    s = Settings(
        **{
            **base.__dict__,
            "database_url": pg_url,
            "broker_url": redis_url,
            "artifact_dir": tmp_path / "artifacts",
            "lease_seconds": 3.0,
            "requeue_after_s": 20.0,
            "sse_poll_seconds": 0.1,
        }
    )
    s.ensure_dirs()
    yield s
    _truncate(pg_url)


def _truncate(url: str) -> None:
    from sqlalchemy import text

    from service.db import get_engine

    with get_engine(url).begin() as conn:
        conn.execute(text("TRUNCATE jobs, job_events, job_layers, artifacts, job_metrics, workers, api_keys CASCADE"))


class Workers:
    """Celery worker processes (each its own process group, so SIGKILL takes its children too)."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings, self.log_dir, self.procs = settings, log_dir, []  # type: ignore[var-annotated]

    def start(self, **env_overrides: str) -> subprocess.Popen:
        from service.cli.servers import worker_command

        log = open(self.log_dir / f"worker-{len(self.procs)}.log", "wb")
        env = {**os.environ, **self.settings.to_env(), **env_overrides}
        proc = subprocess.Popen(worker_command(), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def kill9(self, proc: subprocess.Popen) -> None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("worker-*.log")))


@pytest.fixture
def workers(dist_settings: Settings, tmp_path: Path) -> Iterator[Workers]:
    w = Workers(dist_settings, tmp_path)
    yield w
    w.stop_all()


@pytest.fixture
def client(dist_settings: Settings):
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.api.auth import create_key
    from service.db import session_factory

    with session_factory(dist_settings.database_url)() as session:
        key = create_key(session, "tenant-a")
    with TestClient(create_app(dist_settings)) as api:
        api.headers.update(auth(key))
        yield api


def wait_for(
    predicate: Callable[[], object],
    timeout: float,
    what: str,
    logs: Callable[[], str] = str,
    *,
    interval: float = 0.2,
    progress: Callable[[], object] | None = None,
) -> object:
    """``tests.timing.wait_until``: ``timeout`` is patience (scaled to the machine's speed), and with
    ``progress`` it counts from the last change."""
    return wait_until(predicate, what, timeout=timeout, progress=progress, interval=interval, logs=logs)


def job_of(client, job_id: str) -> dict:
    return client.get(f"/v1/jobs/{job_id}").json()


def finished(client, job_id: str, workers: Workers, timeout: float = 300) -> dict:
    """The job once it is finished; gives up only after ``timeout`` s (scaled) with no progress at all."""
    job = wait_for(
        lambda: (j := job_of(client, job_id))["status"] in ("succeeded", "failed", "cancelled") and j,
        timeout,
        f"job {job_id} to finish",
        workers.logs,
        progress=lambda: (lambda j: (j["status"], j.get("progress"), j.get("attempts")))(job_of(client, job_id)),
    )
    return job  # type: ignore[return-value]


def test_job_end_to_end_through_a_real_worker(client, workers, tmp_path) -> None:
    from rsavq_core.checkpoint.packed import read_checkpoint
    from service.artifacts import extract

    workers.start()
    r = client.post("/v1/jobs", json={"model_id": "smollm2-135m", "bits": 2, "options": RSAVQ_FAST})
    assert r.status_code == 202
    job_id = r.json()["id"]
    # Several minutes on 2 idle cores (the default's shared codebooks search 2^12 entries per
    # column); ``finished`` waits as long as the job keeps reporting progress.
    job = finished(client, job_id, workers)
    assert job["status"] == "succeeded", (job["error"], workers.logs())
    assert len(job["layers"]) == 210 and all(layer["proxy_error"] >= 0 for layer in job["layers"])
    assert 2.0 < job["effective_bpw"] < 2.2 and job["attempts"] == 1
    metrics = client.get(f"/v1/jobs/{job_id}/metrics").json()
    fp = metrics["fp"]["perplexity"]["ppl"]
    q = metrics["quantized"]["perplexity"]["ppl"]
    assert 5 < fp < q  # a real model's perplexity, made worse by 2-bit quantization
    assert metrics["timings"]["quantize"] > 0 and metrics["artifact"]["bytes"] > 10_000_000
    events = client.get(f"/v1/jobs/{job_id}/events").text
    assert "event: progress" in events and '"stage": "quantize"' in events and '"status": "succeeded"' in events
    tar = tmp_path / "artifact.tar"
    with client.stream("GET", f"/v1/jobs/{job_id}/artifact") as response:
        tar.write_bytes(b"".join(response.iter_bytes()))
        etag = response.headers["ETag"]
    assert etag == f'"{hashlib.sha256(tar.read_bytes()).hexdigest()}"'
    artifact = read_checkpoint(extract(tar, tmp_path / "unpacked"))
    assert len(artifact.layers) == 210 and artifact.config.method == "rsavq"


def test_unresolvable_model_and_oversized_job_fail_fast_with_reasons(client, workers) -> None:
    workers.start(RSAVQ_WORKER_MEMORY_GB="0.5")  # a worker too small for the bundled model
    started = time.monotonic()
    missing = client.post("/v1/jobs", json={**RTN_JOB, "model_id": "no-such-org/no-such-model"}).json()["id"]
    job = finished(client, missing, workers, timeout=120)
    assert job["status"] == "failed" and "ModelResolutionError" in job["error"]
    assert "no-such-org/no-such-model" in job["error"]
    too_big = client.post("/v1/jobs", json=RTN_JOB).json()["id"]
    job = finished(client, too_big, workers, timeout=120)
    assert job["status"] == "failed" and "InsufficientMemoryError" in job["error"], job["error"]
    assert re.search(r"needs about [\d.]+ GiB .*weights [\d.]+.* has 0\.50 GiB", job["error"]), job["error"]
    assert time.monotonic() - started < 120


def _progress(client, job_id: str) -> object:
    """What changes while a job works: its status and progress (stage, done)."""
    job = job_of(client, job_id)
    return job["status"], job["progress"]


def _quantize_progress(client, job_id: str) -> int:
    job = job_of(client, job_id)
    return job["progress"]["done"] if job["progress"]["stage"] == "quantize" else 0


def test_worker_killed_mid_job_resumes_from_its_checkpoint(client, workers, dist_settings) -> None:
    from service.db import session_factory

    body = RTN_JOB
    first = workers.start()
    killed_id = client.post("/v1/jobs", json=body).json()["id"]
    wait_for(
        lambda: _quantize_progress(client, killed_id) >= 40,
        300,
        "40 quantized layers",
        workers.logs,
        interval=0.05,
        progress=lambda: _progress(client, killed_id),
    )
    workers.kill9(first)
    done_before = _quantize_progress(client, killed_id)
    assert job_of(client, killed_id)["status"] == "running"  # nobody knows yet: the lease is still live
    workers.start()
    resumed = finished(client, killed_id, workers)
    assert resumed["status"] == "succeeded" and resumed["attempts"] == 2, resumed
    with session_factory(dist_settings.database_url)() as session:
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == killed_id).order_by(JobEvent.id)).all()
    statuses = [e.data.get("status") for e in events if e.kind == "status"]
    # queued, quantizing, back to the queue when the lease expired, quantizing again, evaluating, done
    assert statuses == ["queued", "running", "queued", "running", "running", "succeeded"], statuses
    # the second worker quantized only what the first had not checkpointed
    resumed_from = re.search(r"resuming: (\d+) of 210 layers already checkpointed", workers.logs())
    assert resumed_from and int(resumed_from.group(1)) >= done_before - 1 >= 39, workers.logs()
    # the same job, never interrupted, publishes the same bytes
    clean_id = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "clean"}).json()["id"]
    clean = finished(client, clean_id, workers)
    sha = {j: client.get(f"/v1/jobs/{j}/metrics").json()["artifact"]["sha256"] for j in (killed_id, clean_id)}
    assert clean["status"] == "succeeded" and sha[killed_id] == sha[clean_id]
    ppl = {
        j: client.get(f"/v1/jobs/{j}/metrics").json()["quantized"]["perplexity"]["ppl"] for j in (killed_id, clean_id)
    }
    assert ppl[killed_id] == ppl[clean_id]


def test_cancel_is_honoured_between_layers(client, workers, dist_settings) -> None:
    workers.start()
    job_id = client.post("/v1/jobs", json=RTN_JOB).json()["id"]
    wait_for(
        lambda: _quantize_progress(client, job_id) >= 20,
        300,
        "20 quantized layers",
        workers.logs,
        interval=0.05,
        progress=lambda: _progress(client, job_id),
    )
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["cancel_requested"] is True
    job = finished(client, job_id, workers, timeout=120)
    assert job["status"] == "cancelled" and job["progress"]["done"] < 210, job
    assert client.get(f"/v1/jobs/{job_id}/artifact").status_code == 409
    # its checkpoints are cleaned up (just after the status is written, so allow a moment)
    work = dist_settings.artifact_dir / job_id / "work"
    wait_for(lambda: not work.exists(), 30, "the cancelled job's checkpoints removed", workers.logs, interval=0.05)
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204


def _restart_redis() -> None:
    subprocess.run(["redis-cli", "-h", "127.0.0.1", "shutdown", "nosave"], check=False, capture_output=True)
    subprocess.run(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "-::1",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/var/lib/redis",
            "--logfile",
            "/var/log/redis/ci.log",
        ],
        check=True,
        capture_output=True,
    )
    wait_for(
        lambda: subprocess.run(["redis-cli", "-h", "127.0.0.1", "ping"], capture_output=True).stdout.strip() == b"PONG",
        30,
        "redis to come back",
    )


def test_redis_restarted_mid_job_loses_nothing(client, workers) -> None:
    body = RTN_JOB
    workers.start()
    running = client.post("/v1/jobs", json=body).json()["id"]
    wait_for(
        lambda: _quantize_progress(client, running) >= 10,
        300,
        "the first job to quantize",
        workers.logs,
        progress=lambda: _progress(client, running),
    )
    waiting = client.post("/v1/jobs", json={**body, "bits": 3}).json()["id"]  # its message sits in Redis
    _restart_redis()  # Redis here keeps nothing on disk: the queued message is gone
    later = wait_for(
        lambda: (r := client.post("/v1/jobs", json={**body, "bits": 2})).status_code == 202 and r.json()["id"],
        60,
        "the API to reach Redis again",
    )
    assert isinstance(later, str)  # the accepted job's id (wait_until returns what the predicate gave)
    ids = [running, waiting, later]
    results = [finished(client, job_id, workers, timeout=900) for job_id in ids]
    assert [r["status"] for r in results] == ["succeeded"] * 3, [(r["status"], r["error"]) for r in results]
    assert client.get("/health").json()["broker"] is True


def test_two_workers_racing_for_one_job_run_it_once(client, workers, dist_settings) -> None:
    from service.db import session_factory
    from service.queue import QUANTIZE_TASK, enqueue, make_celery

    workers.start()
    workers.start()
    job_id = client.post(
        "/v1/jobs",
        json={"model_id": "smollm2-135m", "bits": 4, "method": "rtn", "options": {"evaluation": {"perplexity": False}}},
    ).json()["id"]
    app = make_celery(dist_settings)
    for _ in range(3):  # duplicate deliveries of the same job, as a redelivery would produce
        enqueue(app, QUANTIZE_TASK, job_id)
    job = finished(client, job_id, workers)
    assert job["status"] == "succeeded" and job["attempts"] == 1
    wait_for(
        lambda: workers.logs().count("dropping this delivery") >= 3, 60, "the duplicates to be dropped", workers.logs
    )
    with session_factory(dist_settings.database_url)() as session:
        runs = [
            e
            for e in session.scalars(select(JobEvent).where(JobEvent.job_id == job_id))
            if e.kind == "status" and e.data.get("status") == "running"
        ]
    assert len(runs) == 1


def test_a_tenants_flood_does_not_starve_another_tenant(client, workers, dist_settings) -> None:
    """One worker; tenant A submits 4 jobs, then tenant B one: B's job runs second, not fifth."""
    from service.api.auth import create_key
    from service.db import session_factory

    with session_factory(dist_settings.database_url)() as session:
        bob = auth(create_key(session, "tenant-b"))
    quick = {**RTN_JOB, "options": {"evaluation": {"perplexity": False}}}
    flood = [client.post("/v1/jobs", json=quick).json()["id"] for _ in range(4)]
    late = client.post("/v1/jobs", json=quick, headers=bob).json()["id"]
    workers.start()
    jobs = {job_id: finished(client, job_id, workers) for job_id in flood}
    late_job = wait_for(
        lambda: (j := client.get(f"/v1/jobs/{late}", headers=bob).json())["status"] == "succeeded" and j,
        600,
        "tenant B's job",
        workers.logs,
    )
    assert isinstance(late_job, dict)
    jobs[late] = late_job
    assert all(j["status"] == "succeeded" and j["attempts"] == 1 for j in jobs.values())
    order = sorted(jobs, key=lambda job_id: jobs[job_id]["started_at"])
    assert order.index(late) <= 1, order  # at most one of A's jobs ran before it
    assert order[-1] == flood[-1]
    waits = {
        job_id: (
            dt.datetime.fromisoformat(j["started_at"]) - dt.datetime.fromisoformat(j["created_at"])
        ).total_seconds()
        for job_id, j in jobs.items()
    }
    log.info("tenant B waited %.1f s; tenant A's jobs %s s", waits[late], sorted(round(waits[j], 1) for j in flood))


def test_fifty_concurrent_submissions_none_lost_or_duplicated(dist_settings, tmp_path) -> None:
    import redis

    from service.api.auth import create_key
    from service.db import session_factory

    sessions = session_factory(dist_settings.database_url)
    with sessions() as session:
        key = create_key(session, "load")
    port = 18000 + os.getpid() % 1000
    # One tenant submits all 50: this test is about concurrency, not the per-tenant limit (429).
    env = {**os.environ, **dist_settings.to_env(), "RSAVQ_TENANT_MAX_ACTIVE_JOBS": "1000"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "service.api.app:create_app",
            "--factory",
            "--port",
            str(port),
            "--workers",
            "2",
            "--log-level",
            "warning",
        ],
        env=env,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _up(base), 60, "uvicorn")
        results: list[tuple[int, str]] = []
        lock = threading.Lock()

        def submit(i: int) -> None:
            # every submission is sent twice at once with one Idempotency-Key, as a retrying client would
            try:
                with httpx.Client(base_url=base, headers=auth(key), timeout=60) as http:
                    r = http.post(
                        "/v1/jobs",
                        json={"model_id": "smollm2-135m", "bits": 2 + (i // 2 % 5) / 5},
                        headers={"Idempotency-Key": f"sub-{i // 2}"},
                    )
                outcome = (r.status_code, r.json()["id"] if r.status_code == 202 else r.text)
            except (httpx.HTTPError, ValueError) as exc:  # recorded, so the assertion below reports it
                outcome = (0, repr(exc))
            with lock:
                results.append(outcome)

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert len(results) == 100 and all(code == 202 for code, _ in results), [r for r in results if r[0] != 202]
    ids = {job_id for _, job_id in results}
    assert len(ids) == 50
    with sessions() as session:
        stored = set(session.scalars(select(Job.id).where(Job.tenant == "load")))
    assert stored == ids
    assert redis.Redis.from_url(dist_settings.broker_url).llen("gpu") == 50  # one message per job


def _up(base: str) -> bool:
    try:
        return httpx.get(base + "/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
