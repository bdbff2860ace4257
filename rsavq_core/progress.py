"""The one progress callback every long step of the library reports through.

``progress(stage, done, total, detail=None)``: ``stage`` names the step ("calibration forward",
"quantize", "perplexity", ...), ``done`` of ``total`` units are finished, and ``detail`` holds
what the step measures as it goes (a fine-tuning step's ``loss``). It may raise (``JobCancelled``)
to stop the work at the next unit. The command line draws it with tqdm; the worker writes it to
the job's progress and events.

Inside one unit (a layer's k-means rounds, its column blocks) the loops call ``check_stop()``,
which runs the check installed with ``stop_check`` (the worker's: cancelled? lease lost?), so a
cancelled job stops within a round, not at the end of a layer that may take minutes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

_STOP_CHECK: ContextVar[Callable[[], None] | None] = ContextVar("rsavq_stop_check", default=None)


class Progress(Protocol):
    def __call__(self, stage: str, done: int, total: int, detail: Mapping[str, float] | None = None) -> None: ...


@contextmanager
def stop_check(check: Callable[[], None]) -> Iterator[None]:
    """Within this block, ``check_stop()`` calls ``check``, which raises to stop the work."""
    token = _STOP_CHECK.set(check)
    try:
        yield
    finally:
        _STOP_CHECK.reset(token)


def check_stop() -> None:
    """Called from inner loops; cheap (a context lookup) when no check is installed."""
    check = _STOP_CHECK.get()
    if check is not None:
        check()
