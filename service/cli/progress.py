"""Progress on stderr with tqdm: one bar per stage, for the library's runs and for a job's events."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from tqdm import tqdm


class StageBars:
    """A ``Progress`` callback (stage, done, total) drawing 'stage i/N [elapsed<ETA]', one bar per stage."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.stage: str | None = None
        self.bar: tqdm[Any] | None = None

    def __call__(self, stage: str, done: int, total: int, detail: Mapping[str, float] | None = None) -> None:
        if not self.enabled:
            return
        if stage != self.stage or self.bar is None:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=stage, unit="step", file=sys.stderr, dynamic_ncols=True)
        if total != self.bar.total:
            self.bar.total = total
        if detail:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in detail.items()}, refresh=False)
        self.bar.update(done - self.bar.n)

    def note(self, text: str) -> None:
        """A line above the bars (a job's status change)."""
        if self.enabled:
            tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.stage = None, None


class JobEvents:
    """Draws a job's server-sent events (``Client.wait``'s ``on_event``) as stage bars."""

    def __init__(self, enabled: bool = True) -> None:
        self.bars = StageBars(enabled)

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        if event == "progress" and data.get("total"):
            self.bars(str(data.get("stage", "")), int(data.get("done", 0)), int(data["total"]), data.get("detail"))
        elif event == "status":
            self.bars.close()
            error = f": {data['error']}" if data.get("error") else ""
            self.bars.note(f"job {data.get('status')}{error}")

    def close(self) -> None:
        self.bars.close()
