"""Tenants' datasets on disk: stored next to the artifacts (``<store>/datasets/<id>.<ext>``, written
atomically), read back as a ``TextSource`` only if their bytes still have the recorded sha256.
Torch-free: the API stores and validates uploads, workers read them."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from rsavq_core.atomic import write_bytes
from rsavq_core.data.text_files import TextSource, parse_text
from rsavq_core.errors import ArtifactError
from service.artifacts import ArtifactStore
from service.db import Dataset


def dataset_relative_path(dataset_id: str, fmt: str) -> str:
    return f"datasets/{dataset_id}.{'jsonl' if fmt == 'jsonl' else 'txt'}"


def store_dataset(store: ArtifactStore, dataset_id: str, fmt: str, data: bytes) -> str:
    """Write an upload's bytes; returns the path relative to the store."""
    relative = dataset_relative_path(dataset_id, fmt)
    target = store.path(relative)
    write_bytes(target, data)
    return relative


def read_dataset(store: ArtifactStore, row: Dataset) -> TextSource:
    """The dataset's documents, from bytes checked against its recorded sha256."""
    path: Path = store.path(row.path)
    if not path.is_file():
        raise ArtifactError(f"dataset {row.id} ({row.name}) is gone from the store")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != row.sha256:
        raise ArtifactError(f"dataset {row.id} ({row.name}) changed on disk: its sha256 is not the recorded one")
    return parse_text(data, row.name, "jsonl" if row.format == "jsonl" else "text")


def job_dataset_ids(options: dict[str, Any]) -> tuple[str | None, list[str]]:
    """(calibration dataset id or None, evaluation dataset ids in order) named by a job's stored
    options (``options.calibration.dataset``, ``options.evaluation.datasets``)."""
    calibration = (options.get("calibration") or {}).get("dataset")
    return calibration, list((options.get("evaluation") or {}).get("datasets") or [])


def remove_dataset(store: ArtifactStore, row: Dataset) -> None:
    store.path(row.path).unlink(missing_ok=True)
