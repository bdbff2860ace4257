"""The one progress callback every long step of the library reports through.

``progress(stage, done, total)``: ``stage`` names the step ("calibration forward", "quantize",
"perplexity", ...), ``done`` of ``total`` units are finished. It may raise (``JobCancelled``) to
stop the work at the next unit. The command line draws it with tqdm; the worker writes it to the
job's progress and events.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]
