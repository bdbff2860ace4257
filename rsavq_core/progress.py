"""The one progress callback every long step of the library reports through.

``progress(stage, done, total, detail=None)``: ``stage`` names the step ("calibration forward",
"quantize", "perplexity", ...), ``done`` of ``total`` units are finished, and ``detail`` holds
what the step measures as it goes (a fine-tuning step's ``loss``). It may raise (``JobCancelled``)
to stop the work at the next unit. The command line draws it with tqdm; the worker writes it to
the job's progress and events.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class Progress(Protocol):
    def __call__(self, stage: str, done: int, total: int, detail: Mapping[str, float] | None = None) -> None: ...
