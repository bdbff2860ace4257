"""Requests read exactly: Range and Last-Event-ID as RFC 9110 and the SSE spec read them (never a
broken response, never a 500), and job bodies with strict types (nothing coerced)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.api.routes.artifacts import UNSATISFIABLE, _byte_range
from service.api.routes.jobs import _event_id
from tests.service.conftest import auth
from tests.service.test_api import _succeed_with_artifact, submit

HUGE = "9" * 5000


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-99", (0, 100)),
        ("bytes=10-", (10, 1000)),
        ("bytes=990-5000", (990, 1000)),  # last past the end: up to the end
        ("bytes=-10", (990, 1000)),
        ("bytes=-5000", (0, 1000)),  # suffix longer than the file: all of it
        ("bytes=10-5", None),  # last < first: invalid, the header is ignored
        ("bytes=0-1,5-9", None),  # several ranges: served whole
        ("bytes=x-1", None),
        ("bytes=²-", None),  # a non-ASCII digit is not a digit here
        ("items=0-1", None),
        ("bytes=-", None),
        ("bytes=1000-", UNSATISFIABLE),  # starts at the end
        (f"bytes={HUGE}-", UNSATISFIABLE),
        ("bytes=-0", UNSATISFIABLE),  # a zero-length suffix selects nothing
        (f"bytes=0-{HUGE}", (0, 1000)),
        (f"bytes=-{HUGE}", (0, 1000)),
    ],
)
def test_byte_range(header: str, expected: object) -> None:
    assert _byte_range(header, 1000) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, 0), ("", 0), ("42", 42), (" 7 ", 7), ("²", 0), ("-3", 0), ("18446744073709551616", 0), (HUGE, 0)],
)
def test_last_event_id_outside_an_event_id_s_range_is_ignored(header: str | None, expected: int) -> None:
    assert _event_id(header) == expected


def test_odd_ranges_and_event_ids_over_http(api, keys, sessions, settings, tmp_path: Path) -> None:
    job = submit(api, keys["alice"]).json()
    url, h = f"/v1/jobs/{job['id']}", auth(keys["alice"])
    data = _succeed_with_artifact(sessions, settings, job["id"], tmp_path)
    reversed_range = api.get(url + "/artifact", headers={**h, "Range": "bytes=10-5"})
    assert reversed_range.status_code == 200 and reversed_range.content == data
    assert int(reversed_range.headers["Content-Length"]) == len(data)
    huge = api.get(url + "/artifact", headers={**h, "Range": f"bytes={HUGE}-"})
    assert huge.status_code == 416 and huge.headers["Content-Range"] == f"bytes */{len(data)}"
    for last_event_id in ("²", HUGE, "18446744073709551616"):
        events = api.get(url + "/events", headers={**h, "Last-Event-ID": last_event_id.encode()})
        assert events.status_code == 200 and '"status": "succeeded"' in events.text  # from the beginning


@pytest.mark.parametrize(
    "body",
    [
        {"model_id": "smollm2-135m", "bits": True},
        {"model_id": "smollm2-135m", "bits": "2"},
        {"model_id": "smollm2-135m", "bits": 2, "options": {"kmeans_iters": 3.0}},
        {"model_id": "smollm2-135m", "bits": 2, "options": {"compensate": 1}},
        {"model_id": "smollm2-135m", "bits": 2, "options": {"evaluation": {"limit": "5"}}},
    ],
)
def test_job_fields_are_not_coerced(api, keys, body: dict) -> None:
    response = submit(api, keys["alice"], body)
    assert response.status_code == 422, response.text
    assert submit(api, keys["alice"], {"model_id": "smollm2-135m", "bits": 2}).status_code == 202  # an int is a number


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "tools"),
    ],
)
def test_openai_fields_we_cannot_honour_are_refused(extra: dict, message: str) -> None:
    from pydantic import ValidationError

    from service.api.schemas.openai import ChatCompletionRequest

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ValidationError, match=message):
        ChatCompletionRequest.model_validate({**body, **extra})
    plain = ChatCompletionRequest.model_validate({**body, "seed": 2**64 - 1, "response_format": {"type": "text"}})
    assert plain.seed == 2**64 - 1


@pytest.mark.parametrize("cursor", ["abc", "eHx5", "bm90IGEgZGF0ZXwxMjM="])  # not base64; "x|y"; "not a date|123"
def test_a_cursor_we_did_not_write_is_a_422(api, keys, cursor: str) -> None:
    submit(api, keys["alice"])
    response = api.get("/v1/jobs", params={"cursor": cursor}, headers=auth(keys["alice"]))
    assert response.status_code == 422 and "cursor" in response.json()["error"]["message"]


def test_timestamps_carry_their_offset(api, keys) -> None:
    import datetime as dt

    job = submit(api, keys["alice"]).json()
    for field in ("created_at", "updated_at"):
        stamp = dt.datetime.fromisoformat(job[field])
        assert stamp.utcoffset() == dt.timedelta(0), job[field]
    assert job["started_at"] is None


@pytest.mark.parametrize(
    "options",
    [
        {"kmeans_iters": 10**12},
        {"kmeans_iters": 1e30},
        {"calib_samples": 10**6},
        {"seed": -1},
        {"evaluation": {"windows": 10**9}},
        {"evaluation": {"limit": 10**30}},
    ],
)
def test_every_knob_is_bounded(api, keys, options: dict) -> None:
    response = submit(api, keys["alice"], {"model_id": "smollm2-135m", "bits": 2, "options": options})
    assert response.status_code == 422, response.text
    schema = api.get("/openapi.json").json()["components"]["schemas"]
    iters = schema["JobOptions"]["properties"]["kmeans_iters"]["anyOf"][0]
    assert iters["maximum"] == 1000  # the bound is in the OpenAPI, where clients read it


@pytest.mark.parametrize(("mode", "status"), [("open", 200), ("off", 404)])
def test_metrics_can_be_open_or_off(settings, mode: str, status: int) -> None:
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    with TestClient(create_app(settings.model_copy(update={"metrics": mode}))) as client:
        assert client.get("/metrics").status_code == status


def test_odd_bodies_get_our_error_shape(api, keys) -> None:
    headers = {**auth(keys["alice"]), "Content-Type": "application/json"}
    chunked = api.post("/v1/jobs", content=iter([b"{" + b" " * 40_000] * 2 + [b"}"]), headers=headers)
    assert chunked.status_code == 413 and chunked.json()["error"]["type"] == "PayloadTooLargeError"
    for body in (b'{"model_id": "\xff\xfe", "bits": 2}', b"[" * 20_000 + b"]" * 20_000):
        r = api.post("/v1/jobs", content=body, headers=headers)
        assert 400 <= r.status_code < 500 and "message" in r.json()["error"], (r.status_code, r.text[:200])
    missing = api.get("/v1/nothing-here", headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFound"
    small_chunked = api.post(
        "/v1/jobs", content=iter([b'{"model_id": "smollm2-135m",', b' "bits": 2}']), headers=headers
    )
    assert small_chunked.status_code == 202  # a chunked body under the limit reaches the app whole


def test_openapi_documents_auth_errors_and_docs_work_offline(api) -> None:
    schema = api.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key (`rsavq keys create NAME`)",
    }
    get_job = schema["paths"]["/v1/jobs/{job_id}"]["get"]
    assert get_job["security"] == [{"HTTPBearer": []}]
    for code in ("401", "404", "422"):
        ref = get_job["responses"][code]["content"]["application/json"]["schema"]["$ref"]
        assert ref == "#/components/schemas/ErrorBody"
    assert {"206", "304", "416"} <= set(schema["paths"]["/v1/jobs/{job_id}/artifact"]["get"]["responses"])
    docs = api.get("/docs").text
    assert "cdn" not in docs.lower() and "https://" not in docs  # no asset from the internet
    script = next(part.split('"')[1] for part in docs.split("<script src=")[1:])
    assert api.get(script).status_code == 200


def test_a_tenant_s_flood_is_a_429_and_other_tenants_still_submit(settings, keys) -> None:
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    with TestClient(create_app(settings.model_copy(update={"tenant_max_active_jobs": 2}))) as api:
        first = submit(api, keys["alice"], {"model_id": "smollm2-135m", "bits": 2}, **{"Idempotency-Key": "k1"})
        assert first.status_code == 202
        assert submit(api, keys["alice"], {"model_id": "smollm2-135m", "bits": 3}).status_code == 202
        flood = submit(api, keys["alice"], {"model_id": "smollm2-135m", "bits": 4})
        assert flood.status_code == 429 and flood.headers["Retry-After"] == "60"
        assert flood.json()["error"]["type"] == "TooManyRequestsError"
        again = submit(api, keys["alice"], {"model_id": "smollm2-135m", "bits": 2}, **{"Idempotency-Key": "k1"})
        assert again.status_code == 202 and again.json()["id"] == first.json()["id"]  # a retry is not a new job
        assert submit(api, keys["bob"], {"model_id": "smollm2-135m", "bits": 2}).status_code == 202


def test_the_client_skips_keep_alive_comments_between_events() -> None:
    """The API's 15 s ping is an SSE comment; after an event with an id, httpx-sse hands the blank line
    after it on as an empty event, which the client must not parse as JSON (it broke `make demo`)."""
    import httpx

    from service.client import Client

    stream = (
        b'id: 1\r\nevent: status\r\ndata: {"status": "running"}\r\n\r\n'
        b": ping - 2026-12-05 04:27:54\n\n"
        b'id: 2\r\nevent: progress\r\ndata: {"stage": "quantize"}\r\n\r\n'
    )

    def answer(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=stream, headers={"content-type": "text/event-stream"})

    client = Client("http://testserver", "key")
    client.http = httpx.Client(base_url="http://testserver", transport=httpx.MockTransport(answer))
    assert list(client.events("job")) == [
        ("1", "status", {"status": "running"}),
        ("2", "progress", {"stage": "quantize"}),
    ]
