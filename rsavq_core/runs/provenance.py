"""Where a measured number comes from: the code, the machine, the software, the date, the command.

Every result JSON this project writes (``rsavq quantize`` / ``eval`` / ``ablation`` summaries and
every script under ``bench/``) carries ``provenance()`` under the key ``"provenance"``, so a number
can be traced to the commit that produced it and compared only with numbers from a like machine.
The fp32 GFLOP/s figure is measured, not looked up: two machines with the same CPU name differ.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
_GFLOPS_SIZE = 2048  # a 2048² fp32 matmul: large enough to reach the BLAS's speed, ~50 ms on 2 cores


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """This run's provenance: commit (and whether the tree had uncommitted changes), machine, versions,
    date and command line (``argv`` defaults to ``sys.argv``)."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command_line(sys.argv if argv is None else argv),
        **git_state(),
        "machine": machine(),
        "versions": versions(),
    }


def command_line(argv: list[str]) -> str:
    """The command as typed: ``python bench/x.py ...`` for a script, ``rsavq ...`` for an entry point."""
    if argv and argv[0].endswith(".py"):
        return shlex.join(["python", *argv])
    return shlex.join([Path(argv[0]).name, *argv[1:]]) if argv else ""


RESULTS_DIR = "bench/results"  # benchmarks' JSON, relative to the repository root


def git_state(root: Path = REPO_ROOT) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}``; None where the code is not a git checkout.

    Dirty means tracked files differ from the commit; untracked files and the result files under
    ``RESULTS_DIR`` do not count (a benchmark writes its JSON there after each row, and the rows
    after the first ran the committed code all the same).
    """

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", f":(exclude){RESULTS_DIR}")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def machine() -> dict[str, Any]:
    """CPU model, cores, torch's threads, measured fp32 GFLOP/s, memory, load at the start, and the GPU."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "fp32_gflops": round(measured_gflops(), 1),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        # Other work on the machine slows every timing: the 1-minute load average says how busy it was.
        "load_average_1m": round(os.getloadavg()[0], 2),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    return info


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def measured_gflops(size: int = _GFLOPS_SIZE, repeats: int = 5) -> float:
    """fp32 GFLOP/s of a ``size``² matmul on the CPU with torch's threads: the best of ``repeats``."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: the BLAS's first call allocates and picks its kernels
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def versions() -> dict[str, str | None]:
    """Python's and the numerically relevant packages' versions (None: not installed)."""

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "triton": version("triton"),
        "rsavq": version("rsavq"),
    }


def describe(record: dict[str, Any]) -> str:
    """One line for tables: ``<commit>[+dirty], <cpu> x<cores> (<GFLOP/s>), <date>``."""
    m = record.get("machine", {})
    commit = (record.get("commit") or "unknown")[:9] + ("+dirty" if record.get("dirty") else "")
    return f"{commit}, {m.get('cpu')} x{m.get('cores')} ({m.get('fp32_gflops')} GFLOP/s), {record.get('date', '')[:10]}"
