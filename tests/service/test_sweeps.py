"""/v1/sweeps: one request, one job per budget, the results side by side (SQLite, embedded broker)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select, update

from service import jobs as machine
from service.db import Artifact, Job, JobMetrics, Sweep
from tests.service.conftest import auth

SWEEP = {"model_id": "smollm2-135m", "bits": [2, 3, 4], "name": "smol", "options": {"calib_samples": 4}}


def test_a_sweep_queues_one_named_job_per_budget(api, keys) -> None:
    r = api.post("/v1/sweeps", json=SWEEP, headers=auth(keys["alice"]))
    assert r.status_code == 202, r.text
    sweep = r.json()
    assert r.headers["Location"] == f"/v1/sweeps/{sweep['id']}"
    assert sweep["status"] == "queued" and [row["bits"] for row in sweep["rows"]] == [2, 3, 4]
    for row in sweep["rows"]:
        job = api.get(f"/v1/jobs/{row['job_id']}", headers=auth(keys["alice"])).json()
        assert job["status"] == "queued" and job["bits"] == row["bits"]
        assert job["name"] == f"smol-{row['bits']:g}bit" and job["options"]["calib_samples"] == 4
    listed = api.get("/v1/sweeps", headers=auth(keys["alice"])).json()["items"]
    assert [s["id"] for s in listed] == [sweep["id"]]
    assert api.get(f"/v1/sweeps/{sweep['id']}", headers=auth(keys["bob"])).status_code == 404
    assert api.get("/v1/sweeps", headers=auth(keys["bob"])).json()["items"] == []


def test_the_table_fills_in_as_jobs_finish(api, keys, sessions) -> None:
    sweep = api.post("/v1/sweeps", json=SWEEP, headers=auth(keys["alice"])).json()
    ids = [row["job_id"] for row in sweep["rows"]]
    with sessions() as session:  # what a worker records for the 2- and 3-bit jobs
        for job_id, bpw, size, ppl in ((ids[0], 2.07, 60_000_000, 59.1), (ids[1], 3.07, 80_000_000, 28.2)):
            session.execute(update(Job).where(Job.id == job_id).values(status=machine.SUCCEEDED, effective_bpw=bpw))
            session.add(Artifact(job_id=job_id, path=f"{job_id}.tar", size=size, sha256="0" * 64))
            data: dict[str, Any] = {"quantized": {"perplexity": {"ppl": ppl}, "zero_shot": {"average": 0.4}}}
            session.add(JobMetrics(job_id=job_id, data=data))
        session.execute(update(Job).where(Job.id == ids[2]).values(status=machine.RUNNING))
        session.commit()
    got = api.get(f"/v1/sweeps/{sweep['id']}", headers=auth(keys["alice"])).json()
    assert got["status"] == "running"
    first, second, third = got["rows"]
    assert (first["effective_bpw"], first["artifact_bytes"], first["perplexity"]) == (2.07, 60_000_000, 59.1)
    assert second["perplexity"] == 28.2 and second["zero_shot"] == 0.4
    assert third["status"] == "running" and third["perplexity"] is None and third["artifact_bytes"] is None
    with sessions() as session:
        session.execute(update(Job).where(Job.id == ids[2]).values(status=machine.FAILED))
        session.commit()
    assert api.get(f"/v1/sweeps/{sweep['id']}", headers=auth(keys["alice"])).json()["status"] == "mixed"
    assert api.delete(f"/v1/jobs/{ids[2]}", headers=auth(keys["alice"])).status_code == 204
    rows = api.get(f"/v1/sweeps/{sweep['id']}", headers=auth(keys["alice"])).json()["rows"]
    assert rows[2] == {**rows[2], "status": "deleted", "job_id": None} and len(rows) == 3


def test_a_retried_sweep_with_its_idempotency_key_is_the_same_sweep(api, keys, sessions) -> None:
    headers = {**auth(keys["alice"]), "Idempotency-Key": "sweep-1"}
    first = api.post("/v1/sweeps", json=SWEEP, headers=headers)
    again = api.post("/v1/sweeps", json=SWEEP, headers=headers)
    assert first.status_code == again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert again.headers["Location"] == f"/v1/sweeps/{first.json()['id']}"
    other = api.post("/v1/sweeps", json={**SWEEP, "bits": [2, 3]}, headers=headers)
    assert other.status_code == 409 and "different request body" in other.json()["error"]["message"]
    bobs = api.post("/v1/sweeps", json=SWEEP, headers={**auth(keys["bob"]), "Idempotency-Key": "sweep-1"})
    assert bobs.status_code == 202 and bobs.json()["id"] != first.json()["id"]  # keys are per tenant
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 6


def test_deleting_a_sweep_takes_its_jobs_only_once_they_have_ended(api, keys, sessions, settings) -> None:
    sweep = api.post("/v1/sweeps", json=SWEEP, headers=auth(keys["alice"])).json()
    ids = [row["job_id"] for row in sweep["rows"]]
    url = f"/v1/sweeps/{sweep['id']}"
    busy = api.delete(url, headers=auth(keys["alice"]))
    assert busy.status_code == 409 and "queued or running" in busy.json()["error"]["message"]
    artifact = settings.artifact_dir / ids[0] / "artifact.tar"  # where the store publishes a job's tar
    artifact.parent.mkdir(parents=True, exist_ok=True)
    artifact.write_bytes(b"packed")
    with sessions() as session:
        session.execute(update(Job).where(Job.id.in_(ids)).values(status=machine.SUCCEEDED))
        session.add(Artifact(job_id=ids[0], path=f"{ids[0]}/artifact.tar", size=6, sha256="0" * 64))
        session.commit()
    assert api.delete(url, headers=auth(keys["bob"])).status_code == 404  # another tenant's
    assert api.delete(url, headers=auth(keys["alice"])).status_code == 204
    assert api.get(url, headers=auth(keys["alice"])).status_code == 404
    assert all(api.get(f"/v1/jobs/{i}", headers=auth(keys["alice"])).status_code == 404 for i in ids)
    assert not artifact.exists()
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Sweep)) == 0


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"bits": [2, 2]}, "must not repeat"),
        ({"bits": [3]}, "at least 2"),
        ({"bits": [2, 9]}, "[1, 8]"),
        ({"bits": [2, 3], "method": "rtn", "options": {"group_size": 64, "vector_len": 4}}, "vector_len"),
        ({"bits": [2, 3], "options": {"lamda": 1}}, "lamda"),
        ({"model_id": "../etc"}, "model_id"),
    ],
)
def test_bad_sweeps_are_refused_before_anything_is_stored(api, keys, sessions, change, fragment) -> None:
    r = api.post("/v1/sweeps", json={**SWEEP, **change}, headers=auth(keys["alice"]))
    assert r.status_code == 422 and fragment in r.json()["error"]["message"], r.text
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Sweep)) == 0
        assert session.scalar(select(func.count()).select_from(Job)) == 0


def test_a_sweep_counts_every_budget_against_the_tenants_limit(api, keys, settings) -> None:
    many = {**SWEEP, "bits": [2, 2.5, 3, 3.5, 4, 5, 6, 7]}
    assert api.post("/v1/sweeps", json=many, headers=auth(keys["alice"])).status_code == 202
    r = api.post("/v1/sweeps", json={**SWEEP, "bits": [2, 3]}, headers=auth(keys["alice"]))
    assert r.status_code == 429 and "adds 2" in r.json()["error"]["message"]


def test_the_command_line_prints_the_budgets_side_by_side(api, keys) -> None:
    from service.cli.remote import sweep_table

    sweep = api.post("/v1/sweeps", json=SWEEP, headers=auth(keys["alice"])).json()
    sweep["rows"][0].update(status="succeeded", effective_bpw=2.072, artifact_bytes=61_234_567, perplexity=59.31)
    lines = sweep_table(sweep).splitlines()
    assert lines[0].startswith(f"sweep {sweep['id']}  smollm2-135m  rsavq  queued")
    assert lines[1].split()[:6] == ["bits", "status", "bpw", "size", "MB", "perplexity"]
    assert lines[2].split()[:5] == ["2", "succeeded", "2.0720", "61.2", "59.31"]
    assert lines[3].split()[:6] == ["3", "queued", "-", "-", "-", "-"]


def test_a_concurrent_retry_that_loses_the_insert_gets_the_winners_row(api, keys, sessions) -> None:
    from service.api.submission import insert_or_retried

    won = api.post("/v1/sweeps", json=SWEEP, headers={**auth(keys["alice"]), "Idempotency-Key": "race"}).json()
    with sessions() as session:
        first = session.get(Sweep, won["id"])
        tenant, digest = first.tenant, first.request_hash
        loser = Sweep(
            id="f" * 32, tenant=tenant, model_id="smollm2-135m", method="rsavq", bits=[2, 3, 4],
            idempotency_key="race", request_hash=digest,
        )  # fmt: skip
        session.add(loser)
        assert insert_or_retried(session, loser, tenant, "race", digest).id == won["id"]
        other = Sweep(
            id="e" * 32, tenant=tenant, model_id="smollm2-135m", method="rsavq", bits=[2, 3],
            idempotency_key="race", request_hash="0" * 64,
        )  # fmt: skip
        session.add(other)
        with pytest.raises(Exception, match="different request body"):
            insert_or_retried(session, other, tenant, "race", "0" * 64)
