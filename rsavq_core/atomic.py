"""Writing files and folders so that a crash never leaves half of one under its final name.

Everything is written to a temporary name beside the target, unique to the writer (two workers
writing the same statistics never share a temporary file), fsynced, then renamed over the target;
on failure the temporary is removed and the target is untouched. One helper for the library, the
service and the workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """A fresh temporary path beside ``target`` to write to; when the block ends without an error
    the file is fsynced and renamed to ``target`` (atomically replacing what was there)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target)  # the writer creates it, with the process's usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_folder(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(target: Path, data: bytes) -> None:
    with replacing(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: Path, text: str) -> None:
    with replacing(target) as tmp:
        tmp.write_text(text)


def write_json(target: Path, value: Any, **dumps: Any) -> None:
    write_text(target, json.dumps(value, **dumps))


@contextlib.contextmanager
def replacing_folder(target: Path) -> Iterator[Path]:
    """A fresh temporary folder beside ``target`` to fill; when the block ends without an error it
    becomes ``target``. An existing ``target`` is set aside first and removed only once the new
    folder is in place (two renames: there is always a complete folder on disk)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target)
    tmp.mkdir()
    try:
        yield tmp
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        if target.exists():
            target.rename(old)
        try:
            tmp.rename(target)
        except OSError:
            if old.exists():
                old.rename(target)
            raise
        _fsync_folder(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _sibling(target: Path) -> Path:
    """A name beside ``target`` that no other writer (process or thread) uses."""
    return target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename itself is still atomic
    finally:
        os.close(fd)
