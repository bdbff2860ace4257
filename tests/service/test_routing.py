"""The pre-flight's routing by capability: a job runs on a worker whose host memory and device
memory hold its estimate for that kind of device, is released for such a worker, or fails at once."""

from __future__ import annotations

import pytest

from rsavq_core.errors import InsufficientMemoryError
from rsavq_core.models.memory import GIB, MemoryEstimate
from worker.reaper import Capacity
from worker.runner import WrongWorker, route

CPU_RUN = MemoryEstimate(8_000_000_000, {"resident weights": 6 * GIB, "runtime": 1 * GIB})
GPU_RUN = MemoryEstimate(8_000_000_000, {"activations": 2 * GIB}, {"statistics": 20 * GIB})


def estimates(cpu: MemoryEstimate | None = CPU_RUN, gpu: MemoryEstimate | None = GPU_RUN):
    return lambda device: cpu if device.split(":")[0] == "cpu" else gpu


def test_a_worker_that_holds_the_job_runs_it() -> None:
    route(Capacity(24 * GIB), [], estimates())
    route(Capacity(8 * GIB, "cuda:0", 80 * GIB), [], estimates())


def test_a_job_is_released_for_a_worker_that_can_hold_it() -> None:
    small_gpu = Capacity(64 * GIB, "cuda:0", 16 * GIB)
    with pytest.raises(WrongWorker, match="on cuda:0"):
        route(small_gpu, [Capacity(24 * GIB)], estimates())  # the CPU worker holds the CPU estimate
    with pytest.raises(WrongWorker):
        route(Capacity(4 * GIB), [Capacity(8 * GIB, "cuda:0", 80 * GIB)], estimates())


def test_no_worker_that_can_hold_it_fails_with_the_figures() -> None:
    with pytest.raises(InsufficientMemoryError, match=r"needs about 7\.00 GiB .* has 4\.00 GiB"):
        route(Capacity(4 * GIB), [Capacity(2 * GIB)], estimates())
    with pytest.raises(InsufficientMemoryError, match=r"the largest worker's cuda:0 has 16\.00 GiB"):
        route(Capacity(64 * GIB, "cuda:0", 16 * GIB), [], estimates(cpu=None))
