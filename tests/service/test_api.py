"""The HTTP API against a real (SQLite) database and a real embedded broker, without a worker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service import jobs as machine
from service.db import Artifact
from tests.service.conftest import auth
from tests.timing import patience

JOB = {"model_id": "smollm2-135m", "bits": 2}


def submit(api, key, body=JOB, **headers):
    return api.post("/v1/jobs", json=body, headers={**auth(key), **headers})


def test_submit_returns_202_location_and_a_queued_job(api, keys) -> None:
    r = submit(api, keys["alice"], {**JOB, "options": {"calib_samples": 4, "evaluation": {"zero_shot": ["piqa"]}}})
    assert r.status_code == 202
    job = r.json()
    assert r.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["method"] == "rsavq" and job["bits"] == 2
    assert job["options"]["calib_samples"] == 4
    got = api.get(r.headers["Location"], headers=auth(keys["alice"])).json()
    assert got["id"] == job["id"] and got["progress"]["percent"] == 0


def test_a_preset_is_accepted_and_stored_with_the_job(api, keys) -> None:
    from service.api.schemas.jobs import JobRequest

    job = submit(api, keys["alice"], {**JOB, "options": {"preset": "fast", "calib_samples": 8}}).json()
    assert job["options"]["preset"] == "fast" and job["options"]["calib_samples"] == 8
    cfg = JobRequest.model_validate({**JOB, "options": job["options"]}).quant_config()
    assert cfg.calib_samples == 8 and cfg.block_finetune_steps == 0  # the preset, under the explicit knob


def test_embedding_bits_and_allow_partial_are_job_options_the_worker_reads(api, keys) -> None:
    from service.api.schemas.jobs import JobRequest

    body = {**JOB, "options": {"embedding_bits": 4, "allow_partial": True}}
    job = submit(api, keys["alice"], body).json()
    assert job["options"]["embedding_bits"] == 4 and job["options"]["allow_partial"] is True
    cfg = JobRequest.model_validate({**JOB, "options": job["options"]}).quant_config()
    assert cfg.embedding_bits == 4  # a knob of the config; allow_partial is the job's, not the config's
    assert submit(api, keys["alice"], {**JOB, "options": {"embedding_bits": 1}}).status_code == 422


def test_idempotency_key_returns_the_same_job_and_rejects_a_different_body(api, keys) -> None:
    first = submit(api, keys["alice"], **{"Idempotency-Key": "abc"}).json()
    again = submit(api, keys["alice"], **{"Idempotency-Key": "abc"}).json()
    assert again["id"] == first["id"]
    other_tenant = submit(api, keys["bob"], **{"Idempotency-Key": "abc"}).json()
    assert other_tenant["id"] != first["id"]  # keys are scoped to a tenant
    changed = submit(api, keys["alice"], {**JOB, "bits": 3}, **{"Idempotency-Key": "abc"})
    assert changed.status_code == 409 and "different request body" in changed.json()["error"]["message"]
    assert len(api.get("/v1/jobs", headers=auth(keys["alice"])).json()["items"]) == 1


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({**JOB, "colour": "red"}, "colour"),
        ({**JOB, "options": {"lamda": 0.1}}, "lamda"),
        ({**JOB, "bits": 9}, "less than or equal to 8"),
        ({**JOB, "bits": 0.5}, "greater than or equal to 1"),
        ({**JOB, "method": "awq"}, "method"),
        ({**JOB, "model_id": "../../etc/passwd"}, "'..'"),
        ({**JOB, "model_id": "/etc/passwd"}, "local paths are not allowed"),
        ({**JOB, "model_id": "a b c"}, "not a model id"),
        ({**JOB, "method": "rtn", "bits": 2.5}, "bits"),  # QuantConfig's own rule: scalar methods take whole bits
        ({**JOB, "options": {"vector_len": 5, "n_pq": 2}}, "vector_len"),
        ({**JOB, "options": {"evaluation": {"zero_shot": ["mmlu"]}}}, "zero_shot"),
        ({**JOB, "options": {"allocation": "greedy"}}, "allocation"),  # an enum in the schema
        ({**JOB, "options": {"preset": "quick"}}, "preset"),
        ({**JOB, "method": "rtn", "bits": 4, "options": {"kmeans_iters": 3}}, "method rtn has no option kmeans_iters"),
    ],
)
def test_bad_input_is_a_422_that_names_the_problem(api, keys, body, fragment) -> None:
    r = submit(api, keys["alice"], body)
    assert r.status_code == 422, r.text
    assert fragment in r.json()["error"]["message"]


def test_oversized_body_is_413(api, keys) -> None:
    r = api.post(
        "/v1/jobs",
        content=b"{" + b" " * 70_000 + b"}",
        headers={**auth(keys["alice"]), "Content-Type": "application/json"},
    )
    assert r.status_code == 413


def test_missing_unknown_and_revoked_keys_are_401(api, keys, sessions) -> None:
    from service.api.auth import revoke_key

    assert api.get("/v1/jobs").status_code == 401
    assert api.get("/v1/jobs", headers=auth("rsavq_not-a-key")).status_code == 401
    assert api.get("/v1/jobs", headers={"Authorization": "Basic abc"}).status_code == 401
    assert api.get("/v1/jobs", headers=auth(keys["alice"])).status_code == 200
    with sessions() as session:
        assert revoke_key(session, "alice") == 1
    r = api.get("/v1/jobs", headers=auth(keys["alice"]))
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]


def test_keys_are_stored_hashed(keys, sessions) -> None:
    from sqlalchemy import select

    from service.db import ApiKey

    with sessions() as session:
        stored = [row.key_hash for row in session.scalars(select(ApiKey))]
    assert keys["alice"] not in stored and len(stored) == 2 and all(len(h) == 64 for h in stored)


def test_another_tenants_job_is_a_404(api, keys) -> None:
    job = submit(api, keys["alice"]).json()
    for method, path in (
        ("GET", ""),
        ("GET", "/metrics"),
        ("GET", "/artifact"),
        ("POST", "/cancel"),
        ("DELETE", ""),
        ("GET", "/events"),
    ):
        r = api.request(method, f"/v1/jobs/{job['id']}{path}", headers=auth(keys["bob"]))
        assert r.status_code == 404, (method, path, r.status_code)


def test_list_paginates_and_filters(api, keys, sessions) -> None:
    ids = [submit(api, keys["alice"], {**JOB, "bits": 2 + i / 10}).json()["id"] for i in range(5)]
    submit(api, keys["alice"], {**JOB, "model_id": "org/other"})
    with sessions() as session:
        machine.request_cancel(session, ids[0])
    seen, cursor = [], None
    while True:
        page = api.get(
            "/v1/jobs",
            params={"limit": 2, "model_id": "smollm2-135m", **({"cursor": cursor} if cursor else {})},
            headers=auth(keys["alice"]),
        ).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 5
    cancelled = api.get("/v1/jobs", params={"status": "cancelled"}, headers=auth(keys["alice"])).json()["items"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    assert api.get("/v1/jobs", params={"status": "done"}, headers=auth(keys["alice"])).status_code == 422


def test_cancel_a_queued_job_and_delete_it(api, keys, sessions) -> None:
    job = submit(api, keys["alice"]).json()
    url = f"/v1/jobs/{job['id']}"
    assert api.delete(url, headers=auth(keys["alice"])).status_code == 409  # not finished yet
    assert api.post(url + "/cancel", headers=auth(keys["alice"])).json()["status"] == "cancelled"
    assert api.post(url + "/cancel", headers=auth(keys["alice"])).status_code == 409
    events = api.get(url + "/events", headers=auth(keys["alice"]))
    assert events.headers["content-type"].startswith("text/event-stream")
    assert [line for line in events.text.splitlines() if line.startswith("event:")] == ["event: status"] * 2
    assert '"status": "cancelled"' in events.text
    assert api.delete(url, headers=auth(keys["alice"])).status_code == 204
    assert api.get(url, headers=auth(keys["alice"])).status_code == 404
    from sqlalchemy import func, select

    from service.db import JobEvent

    with sessions() as session:  # its events went with it
        assert session.scalar(select(func.count()).where(JobEvent.job_id == job["id"])) == 0


def test_a_stage_s_measured_values_show_in_progress_and_events(api, keys, sessions) -> None:
    job = submit(api, keys["alice"]).json()
    url = f"/v1/jobs/{job['id']}"
    with sessions() as s:
        assert machine.claim(s, job["id"], "w", 30)
        machine.report_progress(s, job["id"], "w", "fine-tune block 3", 5, 64, 7.8, 12.0, 30, {"loss": 0.0125})
    progress = api.get(url, headers=auth(keys["alice"])).json()["progress"]
    assert progress["stage"] == "fine-tune block 3" and progress["done"] == 5 and progress["total"] == 64
    assert progress["detail"] == {"loss": 0.0125}
    with sessions() as s:  # a stage without measured values clears the previous stage's
        machine.report_progress(s, job["id"], "w", "quantize", 1, 210, 0.5, None, 30)
    assert api.get(url, headers=auth(keys["alice"])).json()["progress"]["detail"] is None
    with sessions() as s:
        assert machine.finish(s, job["id"], "w", "cancelled")
    assert api.get(url, headers=auth(keys["alice"])).json()["progress"]["detail"] is None
    events = api.get(url + "/events", headers=auth(keys["alice"]))  # the stream ends with the job
    assert '"detail": {"loss": 0.0125}' in events.text


def _succeed_with_artifact(sessions, settings, job_id: str, tmp_path: Path) -> bytes:
    from service.artifacts import ArtifactStore

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "rsavq.safetensors").write_bytes(bytes(range(256)) * 4000)
    (folder / "config.json").write_text("{}")
    relative, size, sha = ArtifactStore(settings.artifact_dir).publish(job_id, folder)
    with sessions() as session:
        assert machine.claim(session, job_id, "w1", 30)
        session.add(Artifact(job_id=job_id, path=relative, size=size, sha256=sha))
        session.commit()
        assert machine.finish(session, job_id, "w1", machine.SUCCEEDED)
    return (settings.artifact_dir / relative).read_bytes()


def test_artifact_is_409_until_succeeded_then_streams_with_etag_and_ranges(
    api, keys, sessions, settings, tmp_path
) -> None:
    import hashlib

    job = submit(api, keys["alice"]).json()
    url, h = f"/v1/jobs/{job['id']}/artifact", auth(keys["alice"])
    assert api.get(url, headers=h).status_code == 409
    data = _succeed_with_artifact(sessions, settings, job["id"], tmp_path)
    full = api.get(url, headers=h)
    assert full.status_code == 200 and full.content == data
    assert full.headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert int(full.headers["Content-Length"]) == len(data)
    part = api.get(url, headers={**h, "Range": "bytes=1000-1999"})
    assert part.status_code == 206 and part.content == data[1000:2000]
    assert part.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
    assert api.get(url, headers={**h, "Range": "bytes=-10"}).content == data[-10:]
    assert api.get(url, headers={**h, "Range": f"bytes={len(data)}-"}).status_code == 416
    stale = api.get(url, headers={**h, "Range": "bytes=10-", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.content == data  # changed representation: the whole file
    assert api.get(url, headers={**h, "If-None-Match": full.headers["ETag"]}).status_code == 304


def test_client_download_resumes_and_verifies(api, keys, sessions, settings, tmp_path) -> None:
    from service.client import Client

    job = submit(api, keys["alice"]).json()
    data = _succeed_with_artifact(sessions, settings, job["id"], tmp_path)
    client = Client("http://testserver", keys["alice"])
    api.headers.update(auth(keys["alice"]))
    client.http = api  # TestClient is an httpx.Client bound to the in-process app
    dest = tmp_path / "out.tar"
    (tmp_path / "out.tar.part").write_bytes(data[:5000])  # an interrupted earlier download
    assert client.download(job["id"], dest).read_bytes() == data
    (tmp_path / "out.tar.part").write_bytes(b"x" * 5000)  # a corrupt partial file is caught by the digest
    with pytest.raises(Exception, match="sha256"):
        client.download(job["id"], dest)


def test_health_and_prometheus_metrics(api, keys) -> None:
    submit(api, keys["alice"])
    health = api.get("/health")
    assert health.status_code == 200 and health.json() == {
        "status": "ok",
        "database": True,
        "broker": True,
        "generation": "not configured",
    }
    assert api.get("/metrics").status_code == 401  # operators only by default
    assert api.get("/metrics", headers=auth(keys["alice"])).status_code == 401  # a tenant's key is not enough
    text = api.get("/metrics", headers={"Authorization": "Bearer ops-token"}).text
    assert 'rsavq_jobs{status="queued"} 1.0' in text
    assert 'rsavq_jobs{status="failed"} 0.0' in text  # zero-count statuses stay as series
    assert "alice" not in text
    assert 'rsavq_http_requests_total{method="POST",route="/v1/jobs",status="202"} 1.0' in text


def test_openapi_documents_the_quantization_knobs(api) -> None:
    schema = api.get("/openapi.json").json()
    knobs = schema["components"]["schemas"]["JobOptions"]["properties"]
    assert {"lam", "vector_len", "calib_samples", "evaluation"} <= set(knobs)
    assert api.get("/docs").status_code == 200


def test_openapi_shows_choices_as_enums_and_bounds(api) -> None:
    from rsavq_core.config.quant_config import shared_knobs
    from rsavq_core.methods.registry import method_names, option_knobs

    schemas = api.get("/openapi.json").json()["components"]["schemas"]
    knobs = schemas["JobOptions"]["properties"]

    def variant(prop: dict, key: str) -> dict:  # the non-null branch of an optional field
        return next(v for v in prop.get("anyOf", [prop]) if key in v)

    assert variant(knobs["allocation"], "enum")["enum"] == ["proportional", "additive", "uniform"]
    assert variant(knobs["fisher"], "enum")["enum"] == ["exact", "kfac"]
    assert variant(schemas["JobRequest"]["properties"]["method"], "enum")["enum"] == list(method_names())
    assert variant(knobs["kmeans_iters"], "type") == {"type": "integer", "minimum": 1, "maximum": 1000}
    assert variant(knobs["lam"], "type") == {"type": "number", "minimum": 0.0, "maximum": 10.0}
    # Every knob of every method, and every shared one but bits (top level), is a documented option.
    expected = {k.name for k in shared_knobs()} - {"bits"} | set(option_knobs())
    assert expected <= set(knobs) and all(knobs[name].get("description") for name in expected)


def test_the_api_process_never_imports_torch(settings) -> None:
    code = (
        "import sys; from service.api.app import create_app; from service.settings import Settings; "
        "from fastapi.testclient import TestClient; "
        f"c = TestClient(create_app(Settings.from_env({str(settings.data_dir)!r}))); "
        "c.get('/health'); c.get('/openapi.json'); c.post('/v1/jobs', json={}); "
        "import service.cli, service.client; "
        "assert 'torch' not in sys.modules, 'torch was imported'; print('clean')"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "RSAVQ_DATABASE_URL": settings.database_url,
        "RSAVQ_BROKER_URL": settings.broker_url,
    }
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=patience(120))
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr[-2000:]


def test_key_cache_bounds_how_long_a_revoked_key_keeps_working(keys, sessions) -> None:
    import time

    from service.api.auth import KeyCache, revoke_key
    from service.errors import AuthenticationError

    cache = KeyCache(ttl=0.5)
    with sessions() as session:
        assert cache.tenant(session, f"Bearer {keys['alice']}") == "alice"
        revoke_key(session, "alice")
        assert cache.tenant(session, f"Bearer {keys['alice']}") == "alice"  # within the TTL
        time.sleep(0.6)
        with pytest.raises(AuthenticationError, match="revoked"):
            cache.tenant(session, f"Bearer {keys['alice']}")
        with pytest.raises(AuthenticationError):
            cache.tenant(session, "Bearer rsavq_unknown")  # failures are never cached
