"""A small HTTP client of the job API (used by ``rsavq submit/status/wait/download``). No torch.

Server and key default to the settings (``RSAVQ_SERVER``, ``RSAVQ_API_KEY``). ``wait`` follows the
job's server-sent events (httpx-sse), reconnecting with ``Last-Event-ID`` when the stream drops.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import SSEError, connect_sse

from rsavq_core.errors import ArtifactError, ConfigError, RSAVQError
from service.errors import AuthenticationError, ConflictError, NotFoundError, UnavailableError
from service.settings import get_settings

TERMINAL = ("succeeded", "failed", "cancelled")
_BY_STATUS: dict[int, type[RSAVQError]] = {
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: ConfigError,
    422: ConfigError,
    503: UnavailableError,
}


class Client:
    def __init__(self, server: str | None = None, key: str | None = None, timeout: float = 30.0) -> None:
        settings = get_settings() if server is None or key is None else None
        self.server = (server or (settings.server if settings else "")).rstrip("/")
        if key is None and settings is not None and settings.api_key is not None:
            key = settings.api_key.get_secret_value()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise UnavailableError(f"cannot reach {self.server}: {exc}") from exc
        _raise_for(response)
        return response

    def _object(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """A call whose answer is a JSON object (every answer of the job API is)."""
        body = self._call(method, path, **kwargs).json()
        if not isinstance(body, dict):
            raise UnavailableError(f"{self.server}{path} answered {type(body).__name__}, not a JSON object")
        return body

    def submit(
        self,
        model_id: str,
        bits: float,
        method: str = "rsavq",
        options: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {"model_id": model_id, "bits": bits, "method": method, "options": options or {}}
        return self._object("POST", "/v1/jobs", json=body, headers=headers)

    def sweep(
        self,
        model_id: str,
        bits: list[float],
        method: str = "rsavq",
        options: dict[str, Any] | None = None,
        name: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Submit one job per budget (``POST /v1/sweeps``)."""
        body = {"model_id": model_id, "bits": bits, "method": method, "options": options or {}}
        if name is not None:
            body["name"] = name
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._object("POST", "/v1/sweeps", json=body, headers=headers)

    def upload_dataset(self, name: str, data: bytes, content_type: str = "text/plain") -> dict[str, Any]:
        """Store a text for this key's tenant (``POST /v1/datasets``): ``text/plain`` documents at
        blank lines, or ``application/jsonl`` with a string ``text`` per line."""
        headers = {"content-type": content_type}
        return self._object("POST", "/v1/datasets", params={"name": name}, content=data, headers=headers)

    def get_sweep(self, sweep_id: str) -> dict[str, Any]:
        return self._object("GET", f"/v1/sweeps/{sweep_id}")

    def job(self, job_id: str) -> dict[str, Any]:
        return self._object("GET", f"/v1/jobs/{job_id}")

    def metrics(self, job_id: str) -> dict[str, Any]:
        return self._object("GET", f"/v1/jobs/{job_id}/metrics")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._object("POST", f"/v1/jobs/{job_id}/cancel")

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """The job's events as (id, kind, data) from ``last_event_id`` on; ends when the job has ended."""
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        timeout = httpx.Timeout(self.http.timeout.connect, read=None)  # a quiet stream is not a failure
        try:
            with connect_sse(self.http, "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout) as source:
                if source.response.status_code >= 400:
                    source.response.read()
                    _raise_for(source.response)
                for event in source.iter_sse():
                    if not event.data:  # a keep-alive comment that httpx-sse dispatches as an empty event
                        continue
                    yield event.id, event.event, json.loads(event.data)
        except (httpx.TransportError, SSEError) as exc:
            raise UnavailableError(f"event stream of job {job_id} from {self.server} broke: {exc}") from exc

    def wait(
        self,
        job_id: str,
        *,
        poll: float = 1.0,
        timeout: float | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Follow the job's events until it ends; returns the final job.

        ``on_event(kind, data)`` sees every "status" and "progress" event. A broken stream is
        resumed after ``poll`` seconds from the last event seen.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last: str | None = None
        while True:
            try:
                for event_id, kind, data in self.events(job_id, last):
                    last = event_id or last
                    if on_event:
                        on_event(kind, data)
                    if deadline is not None and time.monotonic() > deadline:
                        break
            except UnavailableError:
                if deadline is not None and time.monotonic() > deadline:
                    raise
            job = self.job(job_id)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise UnavailableError(f"job {job_id} still {job['status']} after {timeout:.0f} s")
            time.sleep(poll)

    def download(
        self, job_id: str, dest: str | Path, *, chunk: int = 1 << 20, on_bytes: Callable[[int, int], None] | None = None
    ) -> Path:
        """Download the artifact to ``dest``, resuming a partial ``dest.part``; verifies the sha256."""
        dest = Path(dest)
        part = dest.with_name(dest.name + ".part")
        have = part.stat().st_size if part.exists() else 0
        head = self._call("HEAD", f"/v1/jobs/{job_id}/artifact")
        etag = head.headers["ETag"]
        size = int(head.headers["Content-Length"])
        headers = {"Range": f"bytes={have}-", "If-Range": etag} if 0 < have < size else {}
        if have >= size:
            headers, have = {}, 0
            part.unlink(missing_ok=True)
        try:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/artifact", headers=headers) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for(response)
                mode = "ab" if response.status_code == 206 else "wb"
                have = have if mode == "ab" else 0
                with open(part, mode) as fh:
                    for data in response.iter_bytes(chunk):
                        fh.write(data)
                        have += len(data)
                        if on_bytes:
                            on_bytes(have, size)
        except httpx.TransportError as exc:
            raise UnavailableError(
                f"download interrupted at {have} of {size} bytes (run it again to resume): {exc}"
            ) from exc
        digest = _sha256(part)
        if f'"{digest}"' != etag:
            part.unlink()
            raise ArtifactError(f"downloaded artifact's sha256 {digest} does not match the server's {etag}")
        part.replace(dest)
        return dest


def _raise_for(response: httpx.Response) -> None:
    """The error class of an HTTP error status, with the server's message."""
    if response.status_code < 400:
        return
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:500]
    raise _BY_STATUS.get(response.status_code, RSAVQError)(f"HTTP {response.status_code}: {message}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
