"""Waiting in tests without wall-clock limits that fail on a busy machine.

A test that must not wait forever either waits on an event with a bound that is *patience*: the
seconds it would need on an idle 2-core machine, scaled by how slow this machine is right now
(``slowness``, measured with a fixed workload at the moment of asking); or, for long work that
reports progress (a job's layers, a stage), fails only when nothing has moved for that long
(``wait_until(..., progress=...)``). A machine shared with another CPU-heavy process is then
slower, not red.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Seconds the workload below takes on an idle 2-core machine of this project's kind (AMD EPYC /
# Intel Xeon, measured with nothing else running; see ``slowness``).
REFERENCE_S = 0.020


def _workload() -> float:
    """Seconds for a fixed piece of single-threaded Python: what tests mostly wait on (imports,
    JSON, SQL, HTTP handling), and what a busy machine slows down."""
    started = time.perf_counter()
    total = 0
    for i in range(200_000):
        total += i * i % 7
    return time.perf_counter() - started


def slowness() -> float:
    """How many times slower than an idle machine this one is now (at least 1): best of 3 runs."""
    return max(1.0, min(_workload() for _ in range(3)) / REFERENCE_S)


def patience(seconds: float) -> float:
    """``seconds`` on an idle machine, scaled to this machine's speed right now."""
    return seconds * slowness()


def wait_until(
    predicate: Callable[[], object],
    what: str,
    *,
    timeout: float,
    progress: Callable[[], object] | None = None,
    interval: float = 0.2,
    logs: Callable[[], str] = str,
) -> object:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Fails after ``patience(timeout)`` seconds without it, or, with ``progress``, after that long
    without ``progress()`` changing its value (a job that keeps finishing layers is never cut off).
    """
    deadline = time.monotonic() + patience(timeout)
    seen = progress() if progress else None
    while True:
        value = predicate()
        if value:
            return value
        if progress is not None:
            now_seen = progress()
            if now_seen != seen:
                seen, deadline = now_seen, time.monotonic() + patience(timeout)
        if time.monotonic() > deadline:
            stalled = f" (no progress since {seen!r})" if progress else ""
            raise AssertionError(
                f"gave up waiting for {what} after {timeout:.0f} s of patience{stalled}\n{logs()[-6000:]}"
            )
        time.sleep(interval)
