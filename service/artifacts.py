"""The artifact store: one file per job under a root directory (local or a shared mount).

A checkpoint directory is published as one uncompressed tar whose bytes depend only on its content
(sorted members, zeroed times and owners), written to a temporary name, fsynced and renamed, with
its sha256 computed as it is written. Same content, same digest: a resumed job publishes exactly
the artifact an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
from pathlib import Path
from typing import BinaryIO

from rsavq_core.atomic import replacing
from rsavq_core.errors import ArtifactError
from service.errors import ArtifactDigestError

ARCHIVE_ROOT = "rsavq-checkpoint"


class _HashingWriter:
    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.digest, self.size = fh, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.fh.write(data)


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def relative_path(self, job_id: str) -> str:
        return f"{job_id}/{job_id}.tar"

    def path(self, relative: str) -> Path:
        full = (self.root / relative).resolve()
        if self.root.resolve() not in full.parents:
            raise ArtifactDigestError(f"artifact path {relative!r} escapes the store")
        return full

    def publish(self, job_id: str, folder: Path) -> tuple[str, int, str]:
        """Pack ``folder`` into the store. Returns (relative path, size in bytes, sha256 hex)."""
        relative = self.relative_path(job_id)
        target = self.path(relative)
        name = ARCHIVE_ROOT  # not the job id: two jobs with the same result publish the same bytes
        with replacing(target) as tmp, open(tmp, "wb") as fh:
            writer = _HashingWriter(fh)
            # Stream mode only calls write(); typeshed's overloads want a full IO[bytes].
            with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                tar.add(folder, arcname=name, recursive=False, filter=_normalise)
                for file in sorted(p for p in folder.rglob("*") if p.is_file()):
                    tar.add(file, arcname=f"{name}/{file.relative_to(folder).as_posix()}", filter=_normalise)
        return relative, writer.size, writer.digest.hexdigest()

    def verified_path(self, relative: str, sha256: str) -> Path:
        """The artifact at ``relative`` if its bytes have digest ``sha256``; ``ArtifactDigestError``
        otherwise (a wrong or made-up digest, no such file, or a file that changed)."""
        path = self.path(relative)
        if not path.is_file():
            raise ArtifactDigestError(f"no artifact at {relative!r}")
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != sha256:
            raise ArtifactDigestError(f"the artifact at {relative!r} does not have sha256 {sha256}")
        return path

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.root / job_id, ignore_errors=True)

    def work_dir(self, job_id: str) -> Path:
        """Scratch space of a running job (layer checkpoints), on the same volume as the store."""
        return self.root / job_id / "work"


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    info.mode = 0o755 if info.isdir() else 0o644
    info.pax_headers = {}
    return info


def extract(tar_path: Path, dest: Path) -> Path:
    """Unpack a downloaded artifact; returns the checkpoint directory inside ``dest``."""
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")  # "data": no absolute paths, links out, or devices
        top = {m.name.split("/")[0] for m in tar.getmembers()}
    if len(top) != 1:
        raise ArtifactError(f"{tar_path}: expected one top-level folder, found {sorted(top)}")
    return dest / top.pop()
