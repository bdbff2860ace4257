"""Your own calibration and evaluation text: plain text or JSONL, read and checked (torch-free:
the API validates uploads with it).

Plain text is split into documents at blank lines; JSONL is one JSON object per line with a
string ``text`` field (other fields are ignored). A document is the unit an overlap between
calibration and evaluation text is counted in.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rsavq_core.errors import ConfigError

# Perplexity windows: the protocol's count and length (here, not in data.py, so the torch-free API
# can check an evaluation text's size against them).
EVAL_WINDOWS, EVAL_LEN = 64, 512

# Documents are tokenized as one text joined by a blank line (calibration, evaluation, token counts).
DOCUMENT_SEPARATOR = "\n\n"

TextFormat = Literal["text", "jsonl"]
MAX_TEXT_BYTES = 256 * 2**20  # what a file given to the command line may hold; the API sets its own
_BLANK_LINES = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class TextSource:
    """The documents of one text file, and what identifies it."""

    name: str  # the file's (or the dataset's) name, for reports
    sha256: str  # of the file's bytes
    format: TextFormat
    documents: tuple[str, ...]
    size: int  # bytes

    def joined(self) -> str:
        """The documents as the one text that is tokenized."""
        return DOCUMENT_SEPARATOR.join(self.documents)

    @property
    def label(self) -> str:
        """How protocols and reports name this text: ``<name>@<sha256[:12]>``."""
        return f"{self.name}@{self.sha256[:12]}"


def guess_format(name: str) -> TextFormat:
    return "jsonl" if name.lower().endswith((".jsonl", ".ndjson")) else "text"


def parse_text(data: bytes, name: str, fmt: TextFormat | None = None) -> TextSource:
    """The documents of ``data`` (``fmt`` None: from the name's extension). ``ConfigError`` says
    what is wrong: not UTF-8 (with the byte offset), empty, a JSONL line that is not an object
    with a string ``text`` (with its line number)."""
    fmt = fmt or guess_format(name)
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is not text
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    if fmt == "jsonl":
        documents = []
        # "\n" only: splitlines() would also cut at U+2028 / U+0085, which JSON strings may hold
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{name} line {number} is not JSON: {exc.msg}") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ConfigError(f"{name} line {number} is not an object with a string 'text' field")
            documents.append(row["text"].strip())
    else:
        documents = [part.strip() for part in _BLANK_LINES.split(text.replace("\r\n", "\n"))]
    documents = [d for d in documents if d]
    if not documents:
        raise ConfigError(f"{name} holds no text")
    return TextSource(name, hashlib.sha256(data).hexdigest(), fmt, tuple(documents), len(data))


def read_text_file(path: str | Path, fmt: TextFormat | None = None) -> TextSource:
    """``parse_text`` of a file (at most ``MAX_TEXT_BYTES``)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"no text file at {file}")
    if file.stat().st_size > MAX_TEXT_BYTES:
        raise ConfigError(f"{file} is larger than {MAX_TEXT_BYTES // 2**20} MiB")
    return parse_text(file.read_bytes(), file.name, fmt)


def shared_documents(first: TextSource, second: TextSource) -> int:
    """How many of ``second``'s documents also appear (exactly) in ``first``."""
    seen = set(first.documents)
    return sum(d in seen for d in second.documents)


def check_overlap(calibration: TextSource | None, evaluations: list[TextSource], allow: bool) -> dict[str, int]:
    """{evaluation label: documents it shares with the calibration text}; ``ConfigError`` when any
    does and ``allow`` is false (a model scored on what it was calibrated on looks better than it is).
    ``calibration`` None: the bundled text, whose calibration split the user's texts are compared
    with only when given here (the library passes it)."""
    if calibration is None:
        return {}
    shared = {text.label: shared_documents(calibration, text) for text in evaluations}
    overlapping = {label: n for label, n in shared.items() if n}
    if overlapping and not allow:
        detail = ", ".join(f"{label}: {n} document(s)" for label, n in overlapping.items())
        raise ConfigError(
            f"the evaluation text shares documents with the calibration text {calibration.label} ({detail}); "
            "use other text, or allow the overlap explicitly"
        )
    return shared


def too_short(name: str, size: int, windows: int, length: int) -> str | None:
    """Why a text of ``size`` bytes surely cannot fill ``windows`` windows of ``length`` tokens (a
    token takes at least one byte of UTF-8 in byte-level tokenizers), or None when it may: the
    exact count needs the model's tokenizer and is checked when the windows are cut."""
    if size < windows * length:
        return (
            f"{name} has {size} bytes: too few for {windows} window{'' if windows == 1 else 's'} of {length} tokens "
            "(each token takes at least a byte)"
        )
    return None
