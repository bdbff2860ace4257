"""The one atomic-write helper: whole files or nothing, and writers that never share a temporary."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from rsavq_core.atomic import replacing, replacing_folder, write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "stats.safetensors"
    write_text(target, "old")
    with pytest.raises(RuntimeError), replacing(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.safetensors"]


def test_concurrent_writers_of_one_file_each_write_their_own_temporary(tmp_path: Path) -> None:
    """Two workers computing the same statistics used to share one fixed ``.tmp`` name."""
    target = tmp_path / "block_0000.safetensors"
    temporaries: list[Path] = []
    both_open = threading.Barrier(2)

    def writer(text: str) -> None:
        with replacing(target) as tmp:
            temporaries.append(tmp)
            tmp.write_text(text * 1000)
            both_open.wait(timeout=60)  # both temporaries exist at once

    threads = [threading.Thread(target=writer, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(temporaries)) == 2
    assert target.read_text() in ("a" * 1000, "b" * 1000)  # one whole file, never a mix
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    out = tmp_path / "checkpoint"
    with replacing_folder(out) as tmp:
        (tmp / "a.json").write_text("1")
    with pytest.raises(RuntimeError), replacing_folder(out) as tmp:
        (tmp / "a.json").write_text("2")
        raise RuntimeError("crash")
    assert (out / "a.json").read_text() == "1"
    with replacing_folder(out) as tmp:
        (tmp / "b.json").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["b.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
