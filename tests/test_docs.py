"""The README stays short and first things first, and its numbers are the JSON's, not typed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text().splitlines()


def test_the_readme_is_short_with_the_two_commands_first_and_the_results_early() -> None:
    assert len(README) <= 350
    first = "\n".join(README[:15])
    assert "make demo" in first and "make test" in first
    table = next(i for i, line in enumerate(README) if line.startswith("| run | bits per weight |"))
    assert table < 150
    assert README[table + 2].startswith("| FP |")  # the generated rows are there, not only the markers


def test_the_results_tables_are_generated_from_the_json() -> None:
    """A JSON re-measured without regenerating the tables (or a table edited by hand) fails."""
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "results_tables.py"), "--check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr


def test_every_document_the_readme_names_exists() -> None:
    named = set(re.findall(r"`((?:docs|bench|scripts|deploy)/[\w./-]+\.(?:md|py|json|png))`", "\n".join(README)))
    named |= set(re.findall(r"\]\(((?:docs)/[\w./-]+)\)", "\n".join(README)))
    assert named, "the README names no documents"
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert not missing, missing
