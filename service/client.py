"""A small HTTP client of the job API (used by ``rsavq submit/status/wait/download``). No torch."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from rsavq_core.errors import (
    ArtifactError,
    AuthenticationError,
    ConfigError,
    ConflictError,
    NotFoundError,
    RSAVQError,
    UnavailableError,
)

DEFAULT_SERVER = "http://127.0.0.1:8000"
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
        self.server = (server or os.environ.get("RSAVQ_SERVER") or DEFAULT_SERVER).rstrip("/")
        key = key or os.environ.get("RSAVQ_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise UnavailableError(f"cannot reach {self.server}: {exc}") from exc
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:500]
            raise _BY_STATUS.get(response.status_code, RSAVQError)(f"HTTP {response.status_code}: {message}")
        return response

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
        return self._call("POST", "/v1/jobs", json=body, headers=headers).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}").json()

    def metrics(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}/metrics").json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel").json()

    def wait(
        self,
        job_id: str,
        *,
        poll: float = 1.0,
        timeout: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the job ends; returns the final job. on_progress sees every polled state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_progress:
                on_progress(job)
            if job["status"] in ("succeeded", "failed", "cancelled"):
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
                    raise _BY_STATUS.get(response.status_code, RSAVQError)(f"HTTP {response.status_code}")
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def progress_line(job: dict[str, Any], width: int = 30) -> str:
    """'running quantize [#####.....] 61/210 29.0% ETA 235s' for one polled job state."""
    p = job["progress"]
    filled = int(p["percent"] / 100 * width)
    eta = f" ETA {p['eta_seconds']:.0f}s" if p.get("eta_seconds") else ""
    return (
        f"{job['status']:<9} {p['stage'][:24]:<24} [{'#' * filled}{'.' * (width - filled)}] "
        f"{p['done']}/{p['total']} {p['percent']:5.1f}%{eta}"
    )


_last_line = [""]


def print_progress(job: dict[str, Any]) -> None:
    """Redraw the progress line on stderr when it changed (a log file gets one line per change)."""
    line = progress_line(job)
    if line != _last_line[0]:
        _last_line[0] = line
        sys.stderr.write("\r" + line.ljust(100))
        sys.stderr.flush()
