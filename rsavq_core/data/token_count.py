"""How many tokens a text holds under a model's own tokenizer, without torch or transformers: the
API refuses a dataset too short for a job's windows with it, before the job is stored.

Only the ``tokenizers`` library is used, on the model's ``tokenizer.json`` where the model is
already on disk (``rsavq_core.models.files.existing_folder``); elsewhere the caller falls back to
the byte bound (``text_files.too_short``) and the worker checks the exact count when it cuts the
windows (``rsavq_core.data.windows``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from threading import Lock

from tokenizers import Tokenizer

from rsavq_core.models.files import existing_folder

log = logging.getLogger(__name__)
MAX_COUNTS = 256  # (tokenizer, text) pairs remembered: a job resubmitted over a dataset is not re-tokenized
# (tokenizer file, its mtime, text sha256) -> (tokens counted, whether that is the whole text)
_counts: OrderedDict[tuple[str, int, str], tuple[int, bool]] = OrderedDict()
CHUNK_CHARS = 256 * 1024  # characters tokenized at a time
_counts_lock = Lock()


def tokenizer_file(model_id: str) -> Path | None:
    """The model's ``tokenizer.json`` when the model is on disk, else None (nothing is converted
    or downloaded)."""
    folder = existing_folder(model_id)
    if folder is None:
        return None
    file = folder / "tokenizer.json"
    return file if file.is_file() else None


@lru_cache(maxsize=8)
def _tokenizer(path: str, mtime_ns: int) -> Tokenizer | None:
    try:
        return Tokenizer.from_file(path)
    except Exception as exc:  # the Rust library raises plain Exception for a file it cannot read
        log.warning("cannot read %s (%s): token counts fall back to the byte bound", path, exc)
        return None


def count_tokens(file: Path, sha256: str, text: Callable[[], str], at_least: int) -> int | None:
    """Tokens of ``text()`` under the tokenizer in ``file`` (no special tokens added, as the windows
    are cut), counted only until ``at_least`` is reached: exact below ``at_least``, some count at or
    above it otherwise, so a large upload costs what the job needs rather than a tokenization of
    all of it (a 64 MiB text is ~16 M tokens, gigabytes of encodings). Remembered by the text's
    ``sha256``; None when the file cannot be read.

    The text is tokenized ``CHUNK_CHARS`` at a time, cut before a space where there is one (the
    space opens the next word, as the pre-tokenizer splits it), so the pieces' counts add up to
    the whole text's but for a token or two at a cut without a space (the worker's check is exact).
    """
    mtime = file.stat().st_mtime_ns
    key = (str(file), mtime, sha256)
    with _counts_lock:
        known = _counts.get(key)
        if known is not None and (known[1] or known[0] >= at_least):
            _counts.move_to_end(key)
            return known[0]
    tokenizer = _tokenizer(str(file), mtime)
    if tokenizer is None:
        return None
    whole, count, start = text(), 0, 0
    while start < len(whole) and count < at_least:
        stop = _cut(whole, start)
        count += len(tokenizer.encode(whole[start:stop], add_special_tokens=False).ids)
        start = stop
    with _counts_lock:
        _counts[key] = (count, start >= len(whole))
        _counts.move_to_end(key)
        while len(_counts) > MAX_COUNTS:
            _counts.popitem(last=False)
    return count


def _cut(text: str, start: int) -> int:
    """Where the piece of ``text`` from ``start`` ends: CHUNK_CHARS on, moved back to a space in the
    piece's second half where there is one."""
    end = start + CHUNK_CHARS
    if end >= len(text):
        return len(text)
    space = text.rfind(" ", start + CHUNK_CHARS // 2, end)
    return space if space > start else end


def too_few_tokens(name: str, tokens: int, windows: int, length: int) -> str | None:
    """Why ``tokens`` surely cannot fill ``windows`` windows of ``length`` tokens, or None.

    A window takes ``length`` of the text's tokens, or ``length - 1`` when the tokenizer puts BOS
    in front (``data.bos_token``); the smaller need is checked here so that nothing the worker
    would accept is refused, and the worker checks the exact one.
    """
    need = windows * (length - 1)
    if tokens < need:
        return (
            f"{name} holds {tokens} tokens of the model's tokenizer: too few for {windows} "
            f"window{'' if windows == 1 else 's'} of {length} tokens (at least {need} needed)"
        )
    return None
