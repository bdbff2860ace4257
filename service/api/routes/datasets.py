"""/v1/datasets: a tenant's own calibration and evaluation text (upload, list, read, delete), and
the checks a job naming datasets gets before it is stored."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session

from rsavq_core.data.text_files import EVAL_LEN, TextSource, check_overlap, parse_text, too_short
from rsavq_core.data.token_count import count_tokens, tokenizer_file, too_few_tokens
from rsavq_core.errors import ConfigError
from service import jobs as machine
from service.api.deps import Context, DbSession, get_context, tenant_of
from service.api.schemas.jobs import DatasetList, DatasetOut, JobRequest
from service.artifacts import ArtifactStore
from service.datasets import job_dataset_ids, read_dataset, remove_dataset, store_dataset
from service.db import Dataset, Job
from service.errors import ConflictError, NotFoundError

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
Tenant = Annotated[str, Depends(tenant_of)]
Ctx = Annotated[Context, Depends(get_context)]
NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
UPLOAD = {
    "requestBody": {
        "required": True,
        "content": {
            "text/plain": {"schema": {"type": "string"}},
            "application/jsonl": {"schema": {"type": "string", "description": "one {'text': ...} object per line"}},
        },
    }
}


def dataset_out(row: Dataset) -> DatasetOut:
    return DatasetOut(
        id=row.id,
        name=row.name,
        format=row.format,
        size=row.size,
        sha256=row.sha256,
        documents=row.documents,
        created_at=row.created_at,
        links={"self": f"/v1/datasets/{row.id}"},
    )


def load_dataset(session: Session, tenant: str, dataset_id: str) -> Dataset:
    """The tenant's dataset; another tenant's is indistinguishable from a missing one (404)."""
    row = session.get(Dataset, dataset_id)
    if row is None or row.tenant != tenant:
        raise NotFoundError(f"no dataset {dataset_id!r}")
    return row


def check_job_datasets(session: Session, tenant: str, store: ArtifactStore, body: JobRequest) -> None:
    """Before a job naming datasets is stored: they exist for this tenant (404), each text can fill
    its windows, and no evaluation text repeats a calibration document unless allowed (422).

    Tokens are counted with the model's own tokenizer where the model is on this host's disk (the
    embedded service, a shared cache); elsewhere only the byte bound is checked here, and a worker
    checks the exact count before quantizing and fails the job saying so."""
    calibration = body.options.calibration
    eval_rows = [load_dataset(session, tenant, i) for i in body.options.evaluation.datasets or []]
    calib_row = (
        None
        if calibration is None or calibration.dataset is None
        else load_dataset(session, tenant, calibration.dataset)
    )
    tokenizer = tokenizer_file(body.model_id) if eval_rows or calib_row else None
    texts: dict[str, TextSource] = {}

    def text_of(row: Dataset) -> TextSource:  # each file read (and its sha256 checked) once per check
        if row.id not in texts:
            texts[row.id] = read_dataset(store, row)
        return texts[row.id]

    for row in eval_rows:  # fewer windows than the protocol's are scored; none at all is an error
        refuse_short(text_of, row, tokenizer, 1, EVAL_LEN, "evaluation")
    if calibration is None or calib_row is None:
        return
    cfg = body.quant_config()
    refuse_short(text_of, calib_row, tokenizer, cfg.calib_samples, cfg.calib_len, "calibration")
    if eval_rows and not calibration.allow_overlap:  # the texts are read only to compare documents
        check_overlap(text_of(calib_row), [text_of(r) for r in eval_rows], allow=False)


def refuse_short(
    text_of: Callable[[Dataset], TextSource],
    row: Dataset,
    tokenizer: Path | None,
    windows: int,
    length: int,
    role: str,
) -> None:
    """``ConfigError`` (422) when the dataset cannot fill ``windows`` windows of ``length`` tokens:
    by its size, then by its token count when the model's tokenizer is at hand (the text is read
    through ``text_of`` only when the count is not remembered)."""
    short = too_short(row.name, row.size, windows, length)
    if short is None and tokenizer is not None:
        need = windows * length  # counting stops there: past it the exact count does not matter
        tokens = count_tokens(tokenizer, row.sha256, lambda: text_of(row).joined(), need)
        short = None if tokens is None else too_few_tokens(row.name, tokens, windows, length)
    if short:
        raise ConfigError(f"{role} dataset {row.id}: {short}")


@router.post("", status_code=201, response_model=DatasetOut, openapi_extra=UPLOAD, summary="Upload a text")
async def upload(
    request: Request,
    response: Response,
    tenant: Tenant,
    ctx: Ctx,
    session: DbSession,
    name: Annotated[str, Query(pattern=NAME, description="a name for the text, shown in reports")],
    format: Annotated[Literal["text", "jsonl"] | None, Query(description="default: from Content-Type")] = None,
) -> DatasetOut:
    data = await request.body()  # bounded by RSAVQ_MAX_DATASET_BYTES (the body-limit middleware)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    fmt = format or ("jsonl" if content_type in ("application/jsonl", "application/x-ndjson") else "text")
    # not UTF-8, empty, a bad JSONL line: ConfigError -> 422. Parsing and writing megabytes happen
    # off the event loop, which serves every other request and stream meanwhile.
    text = await run_in_threadpool(parse_text, data, name, fmt)
    dataset_id = uuid.uuid4().hex
    store = ArtifactStore(ctx.settings.artifact_dir)
    relative = await run_in_threadpool(store_dataset, store, dataset_id, fmt, data)
    row = Dataset(
        id=dataset_id,
        tenant=tenant,
        name=name,
        format=fmt,
        size=len(data),
        sha256=text.sha256,
        documents=len(text.documents),
        path=relative,
    )
    session.add(row)
    session.commit()
    response.headers["Location"] = f"/v1/datasets/{dataset_id}"
    return dataset_out(row)


@router.get("", response_model=DatasetList, summary="This key's datasets, newest first")
def list_datasets(tenant: Tenant, session: DbSession) -> DatasetList:
    rows = session.scalars(select(Dataset).where(Dataset.tenant == tenant).order_by(Dataset.created_at.desc()))
    return DatasetList(items=[dataset_out(row) for row in rows])


@router.get("/{dataset_id}", response_model=DatasetOut, summary="One dataset")
def get_dataset(dataset_id: str, tenant: Tenant, session: DbSession) -> DatasetOut:
    return dataset_out(load_dataset(session, tenant, dataset_id))


def active_jobs_using(session: Session, tenant: str, dataset_id: str) -> list[str]:
    """The tenant's queued or running jobs that name the dataset (bounded by the active-job limit,
    so their options are read here rather than queried as JSON, which SQLite and PostgreSQL spell
    differently)."""
    rows = session.execute(select(Job.id, Job.options).where(Job.tenant == tenant, Job.status.in_(machine.ACTIVE)))
    users = []
    for job_id, options in rows:
        calibration, evaluation = job_dataset_ids(options or {})
        if dataset_id == calibration or dataset_id in evaluation:
            users.append(job_id)
    return users


@router.delete(
    "/{dataset_id}",
    status_code=204,
    summary="Delete a dataset (409 while a queued or running job needs it)",
    responses={409: {"description": "a queued or running job calibrates or evaluates on it"}},
)
def delete_dataset(dataset_id: str, tenant: Tenant, ctx: Ctx, session: DbSession) -> Response:
    row = load_dataset(session, tenant, dataset_id)
    users = active_jobs_using(session, tenant, dataset_id)
    if users:
        raise ConflictError(
            f"dataset {dataset_id} is needed by {len(users)} queued or running job(s) ({', '.join(users[:5])}); "
            "cancel them or wait until they end"
        )
    session.delete(row)
    session.commit()  # the row first: a job submitted meanwhile sees a missing dataset (404), not a missing file
    remove_dataset(ArtifactStore(ctx.settings.artifact_dir), row)
    return Response(status_code=204)
