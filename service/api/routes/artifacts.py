"""The packed checkpoint (streamed, resumable with Range, sha256 ETag) and a job's metrics."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import jobs as machine
from service.api.deps import Context, DbSession, get_context, tenant_of
from service.api.routes.jobs import load_job
from service.db import Artifact, JobLayer, JobMetrics
from service.errors import ConflictError, NotFoundError

router = APIRouter(prefix="/v1/jobs", tags=["artifacts"])
Tenant = Annotated[str, Depends(tenant_of)]
Ctx = Annotated[Context, Depends(get_context)]
CHUNK = 1 << 20


def _artifact(session: Session, tenant: str, job_id: str) -> Artifact:
    job = load_job(session, tenant, job_id)
    artifact = session.get(Artifact, job_id)
    if job.status != machine.SUCCEEDED or artifact is None:
        raise ConflictError(f"job {job_id} is {job.status}; its artifact exists once it has succeeded")
    return artifact


def _read(path: Path, start: int, stop: int) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        fh.seek(start)
        left = stop - start
        while left > 0:
            chunk = fh.read(min(CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk


# One range, ASCII digits only; several ranges (a comma) are served whole, which RFC 9110 allows.
_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")
# An offset with more digits than this lies past the end of any file we store (and int() of
# thousands of digits would raise): it is read as "beyond the end".
_MAX_DIGITS = 18
UNSATISFIABLE = (-1, -1)


def _offset(digits: str) -> int:
    return int(digits) if len(digits) <= _MAX_DIGITS else 10**_MAX_DIGITS


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """[start, stop) of a single-range header (RFC 9110 §14.1.2); None to serve the whole
    representation (malformed, several ranges, or last < first, which makes the range invalid);
    ``UNSATISFIABLE`` for a valid range that selects no byte (answered 416)."""
    match = _RANGE.fullmatch(header.strip())
    if not match or not (match.group(1) or match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    if first:
        start = _offset(first)
        if last and _offset(last) < start:
            return None
        if start >= size:
            return UNSATISFIABLE
        return start, min(size, _offset(last) + 1) if last else size
    suffix = _offset(last)  # "bytes=-N": the last N bytes
    if suffix == 0 or size == 0:
        return UNSATISFIABLE
    return max(0, size - suffix), size


@router.head("/{job_id}/artifact", operation_id="artifact_headers", include_in_schema=True)
@router.get(
    "/{job_id}/artifact",
    operation_id="download_artifact",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": {}}}, 206: {}, 409: {}, 416: {}},
)
def download(
    job_id: str,
    tenant: Tenant,
    ctx: Ctx,
    session: DbSession,
    range: Annotated[str | None, Header()] = None,  # the header's name, though it shadows the builtin
    if_range: Annotated[str | None, Header()] = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    artifact = _artifact(session, tenant, job_id)
    path = ctx.store.path(artifact.path)
    if not path.exists():
        raise NotFoundError(f"the artifact of job {job_id} is missing from the store")
    etag = f'"{artifact.sha256}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Repr-Digest": f"sha-256=:{base64.b64encode(bytes.fromhex(artifact.sha256)).decode()}:",
        "Content-Disposition": f'attachment; filename="rsavq-{job_id}.tar"',
    }
    if if_none_match and etag in [t.strip() for t in if_none_match.split(",")]:
        return Response(status_code=304, headers=headers)
    size = artifact.size
    wanted = _byte_range(range, size) if range and (not if_range or if_range.strip() == etag) else None
    if wanted == UNSATISFIABLE:
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    start, stop = wanted or (0, size)
    headers["Content-Length"] = str(stop - start)
    status = 200
    if wanted is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    return StreamingResponse(
        _read(path, start, stop), status_code=status, media_type="application/x-tar", headers=headers
    )


@router.get("/{job_id}/metrics")
def job_metrics(job_id: str, tenant: Tenant, session: DbSession) -> dict[str, Any]:
    """FP and quantized perplexity, zero-shot scores, bpw, sizes and timings (filled as they are known)."""
    job = load_job(session, tenant, job_id)
    row = session.get(JobMetrics, job_id)
    artifact = session.get(Artifact, job_id)
    errors = [r.report.get("proxy_error") for r in session.scalars(select(JobLayer).where(JobLayer.job_id == job_id))]
    data: dict[str, Any] = dict(row.data) if row else {}
    data.update(job_id=job_id, status=job.status, effective_bpw=job.effective_bpw)
    if artifact is not None:
        data["artifact"] = {"bytes": artifact.size, "sha256": artifact.sha256}
    finite = [e for e in errors if isinstance(e, int | float)]
    if finite:
        data["mean_layer_proxy_error"] = sum(finite) / len(finite)
    return data
