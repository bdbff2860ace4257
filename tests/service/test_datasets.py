"""/v1/datasets and jobs that calibrate or evaluate on them (SQLite, embedded broker; the last
test runs the worker's steps in this process on a tiny local model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from rsavq_core.data.windows import wiki_documents
from service.db import Dataset
from tests.service.conftest import auth

DOCS = wiki_documents()
CALIB = "\n\n".join(DOCS[:40]).encode()
EVAL = "\n\n".join(DOCS[40:50]).encode()


def upload(api: TestClient, key: str, data: bytes, name: str = "notes", **params: str) -> Any:
    ctype = params.pop("content_type", "text/plain")
    return api.post(
        "/v1/datasets", params={"name": name, **params}, content=data, headers={**auth(key), "content-type": ctype}
    )


def test_upload_list_read_and_delete(api, keys, settings) -> None:
    r = upload(api, keys["alice"], b"one\n\ntwo\n\nthree\n")
    assert r.status_code == 201, r.text
    text = r.json()
    assert (text["format"], text["documents"], text["size"]) == ("text", 3, 16)
    assert r.headers["Location"] == f"/v1/datasets/{text['id']}"
    rows = b'{"text": "a"}\n{"text": "b"}\n'
    jsonl = upload(api, keys["alice"], rows, "rows", content_type="application/jsonl").json()
    assert jsonl["format"] == "jsonl" and jsonl["documents"] == 2
    listed = api.get("/v1/datasets", headers=auth(keys["alice"])).json()["items"]
    assert [d["id"] for d in listed] == [jsonl["id"], text["id"]]
    assert api.get(f"/v1/datasets/{text['id']}", headers=auth(keys["bob"])).status_code == 404
    assert api.get("/v1/datasets", headers=auth(keys["bob"])).json()["items"] == []
    stored = settings.artifact_dir / f"datasets/{text['id']}.txt"
    assert stored.read_bytes() == b"one\n\ntwo\n\nthree\n"
    assert api.delete(f"/v1/datasets/{text['id']}", headers=auth(keys["bob"])).status_code == 404
    assert api.delete(f"/v1/datasets/{text['id']}", headers=auth(keys["alice"])).status_code == 204
    assert not stored.exists() and api.get(f"/v1/datasets/{text['id']}", headers=auth(keys["alice"])).status_code == 404


@pytest.mark.parametrize(
    "data, params, message",
    [
        (b"caf\xe9", {}, "not UTF-8 text"),
        (b"\n \n", {}, "holds no text"),
        (b'{"text": 1}\n', {"format": "jsonl"}, "line 1 is not an object with a string 'text'"),
        (b"text", {"name": "../x"}, "name"),
    ],
)
def test_malformed_uploads_are_422_and_store_nothing(api, keys, sessions, data, params, message) -> None:
    r = upload(api, keys["alice"], data, **params)
    assert r.status_code == 422 and message in r.json()["error"]["message"], r.text
    with sessions() as session:
        assert session.query(Dataset).count() == 0


def test_an_upload_over_the_dataset_limit_is_413(settings) -> None:
    from service.api.app import create_app
    from service.api.auth import create_key
    from service.db import session_factory

    small = settings.model_copy(update={"max_dataset_bytes": 100})
    with session_factory(small.database_url)() as session:
        key = create_key(session, "carol")
    with TestClient(create_app(small)) as api:
        assert upload(api, key, b"x" * 100).status_code == 201
        r = upload(api, key, b"x" * 101)
        assert r.status_code == 413 and "over 100 bytes" in r.json()["error"]["message"]
        streamed = api.post(  # no Content-Length: counted while the handler reads it
            "/v1/datasets",
            params={"name": "streamed"},
            content=(b"x" * 40 for _ in range(3)),
            headers={**auth(key), "content-type": "text/plain"},
        )
        assert streamed.status_code == 413 and "over 100 bytes" in streamed.json()["error"]["message"]
        anonymous = api.post("/v1/datasets", params={"name": "anon"}, content=(b"x" * 40 for _ in range(2)))
        assert anonymous.status_code == 401  # refused before its body is read
        assert api.post("/v1/jobs", content=b"x" * 70_000, headers=auth(key)).status_code == 413  # others keep 64 KiB


def _job(model: str, calib: str | None, evals: list[str], **calibration: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"calib_samples": 2, "calib_len": 16, "group_size": 16}
    options["evaluation"] = {"perplexity": False, "datasets": evals, "windows": 2}
    if calib is not None:
        options["calibration"] = {"dataset": calib, **calibration}
    return {"model_id": model, "bits": 3, "method": "gptq", "options": options}


def test_jobs_naming_datasets_are_checked_before_they_are_stored(api, keys) -> None:
    calib = upload(api, keys["alice"], CALIB, "calib").json()["id"]
    clean = upload(api, keys["alice"], EVAL, "eval").json()["id"]
    dirty = upload(api, keys["alice"], "\n\n".join(DOCS[5:7]).encode(), "dirty").json()["id"]
    tiny = upload(api, keys["alice"], b"Too short to calibrate on.", "tiny").json()["id"]
    bobs = upload(api, keys["bob"], EVAL, "bobs").json()["id"]
    submit = lambda body: api.post("/v1/jobs", json=body, headers=auth(keys["alice"]))  # noqa: E731
    assert submit(_job("smollm2-135m", "nope", [])).status_code == 404
    assert submit(_job("smollm2-135m", calib, [bobs])).status_code == 404  # another tenant's
    short = submit(_job("smollm2-135m", tiny, []))
    assert short.status_code == 422 and "too few for 2 windows of 16 tokens" in short.json()["error"]["message"]
    no_window = submit(_job("smollm2-135m", calib, [tiny]))  # an evaluation text needs one 512-token window
    assert no_window.status_code == 422 and "too few for 1 window of 512" in no_window.json()["error"]["message"]
    overlap = submit(_job("smollm2-135m", calib, [clean, dirty]))
    assert overlap.status_code == 422 and "shares documents" in overlap.json()["error"]["message"]
    allowed = submit(_job("smollm2-135m", calib, [dirty], allow_overlap=True))
    assert allowed.status_code == 202
    assert allowed.json()["options"]["calibration"] == {"dataset": calib, "allow_overlap": True}
    assert submit(_job("smollm2-135m", calib, [clean])).status_code == 202
    # queued jobs need calib, clean and dirty: deleting them is refused; an unused text goes
    for needed in (calib, clean, dirty):
        r = api.delete(f"/v1/datasets/{needed}", headers=auth(keys["alice"]))
        assert r.status_code == 409 and "queued or running job" in r.json()["error"]["message"], r.text
    assert api.delete(f"/v1/datasets/{tiny}", headers=auth(keys["alice"])).status_code == 204


def test_a_job_calibrated_and_evaluated_on_uploaded_text(keys, settings, tiny_llama, tmp_path: Path) -> None:
    from rsavq_core.settings import override
    from service.api.app import create_app
    from worker.runner import WorkerContext, claim_job, run_job

    model, tokenizer = tiny_llama
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    local = settings.model_copy(update={"allow_local_models": True})
    with TestClient(create_app(local)) as api, override(cache_dir=tmp_path / "cache"):
        calib = upload(api, keys["alice"], CALIB, "calib").json()
        evaluation = upload(api, keys["alice"], EVAL, "eval").json()
        job = api.post("/v1/jobs", json=_job(str(folder), calib["id"], [evaluation["id"]]), headers=auth(keys["alice"]))
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        ctx = WorkerContext.from_settings(local)
        assert claim_job(ctx, job_id) == job_id and run_job(ctx, job_id) == "evaluate"
        assert claim_job(ctx, job_id, "evaluate") == job_id and run_job(ctx, job_id, "evaluate") == "succeeded"
        metrics = api.get(f"/v1/jobs/{job_id}/metrics", headers=auth(keys["alice"])).json()
    assert metrics["calibration_text"] == {"name": "calib", "sha256": calib["sha256"]}
    ((label, scored),) = metrics["quantized"]["perplexity_on"].items()
    assert label == f"eval@{evaluation['sha256'][:12]}" and scored["windows"] == 2 and scored["ppl"] > 1
    assert metrics["fp"]["perplexity_on"][label]["ppl"] > 1
    assert metrics["evaluation"]["texts"] == [{"name": "eval", "sha256": evaluation["sha256"], "documents": 10}]
    assert json.dumps(metrics)  # plain JSON all the way


def test_the_command_line_uploads_text_and_jsonl(api, keys, tmp_path: Path, monkeypatch) -> None:
    import argparse

    from service.cli import remote
    from service.client import Client

    client = Client("http://testserver", keys["alice"])
    api.headers.update(auth(keys["alice"]))
    client.http = api  # TestClient is an httpx.Client bound to the in-process app
    monkeypatch.setattr(remote, "_client", lambda args: client)
    notes = tmp_path / "notes.txt"
    notes.write_bytes(EVAL)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:3]))
    text = remote.cmd_dataset_upload(argparse.Namespace(file=str(notes), name=None, jsonl=False))
    jsonl = remote.cmd_dataset_upload(argparse.Namespace(file=str(rows), name="three", jsonl=False))
    assert (text["name"], text["format"], text["documents"]) == ("notes", "text", 10)
    assert (jsonl["name"], jsonl["format"], jsonl["documents"]) == ("three", "jsonl", 3)
    with pytest.raises(Exception, match="not a file"):
        remote.cmd_dataset_upload(argparse.Namespace(file=str(tmp_path / "missing.txt"), name=None, jsonl=False))


def test_a_text_with_enough_bytes_but_too_few_tokens_is_422(keys, settings, smol_dir, tmp_path: Path) -> None:
    from rsavq_core.settings import override
    from service.api.app import create_app

    folder = tmp_path / "model"  # the model's files as the API host sees them: config and tokenizer
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((smol_dir / name).read_bytes())
    text = DOCS[0][:600].encode()  # 600 bytes, about 130 tokens
    local = settings.model_copy(update={"allow_local_models": True})
    with TestClient(create_app(local)) as api:
        notes = upload(api, keys["alice"], text, "notes").json()["id"]
        body = _job(str(folder), notes, [])
        body["options"].update(calib_samples=4, calib_len=64)  # 256 bytes: the byte bound passes
        refused = api.post("/v1/jobs", json=body, headers=auth(keys["alice"]))
        assert refused.status_code == 422, refused.text
        message = refused.json()["error"]["message"]
        assert (
            f"calibration dataset {notes}: notes holds" in message and "too few for 4 windows of 64 tokens" in message
        )
        body["options"].update(calib_samples=2, calib_len=32)
        assert api.post("/v1/jobs", json=body, headers=auth(keys["alice"])).status_code == 202
        with override(cache_dir=tmp_path / "empty-cache"):  # a model not on this host: the byte bound only
            body = _job("smollm2-135m", notes, [])
            body["options"].update(calib_samples=4, calib_len=64)
            assert api.post("/v1/jobs", json=body, headers=auth(keys["alice"])).status_code == 202
