"""The import contracts (``.importlinter``) hold, and a deliberate violation of each layer rule fails them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.timing import patience

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "rsavq_core", "service", "worker")
# The contracts' names in .importlinter.
KERNELS = "kernels imports nothing of ours (tensors in, tensors out)"
LIBRARY = "rsavq_core imports neither the service nor the workers, nor web, queue or database libraries"
SERVICE = "service never imports worker (the command line starts workers as processes)"
WORKER = "worker never imports the HTTP layer or the command line"
LAYERS = "service: the command line over the HTTP layer over the shared layer (every module listed)"
CORE = (
    "rsavq_core: whole runs over the pipeline over fine-tuning over the runtime over evaluation over methods over "
    "algorithms over calibration over checkpoints, text and models over formats over the run's configuration "
    "(every module listed)"
)


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the packages under ``root`` (its copy shadows the installed ones)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    tool = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(tool), "--no-cache", "--config", str(root / ".importlinter")],
        cwd=root, env=env, capture_output=True, text=True, timeout=patience(300),
    )  # fmt: skip


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the packages (Python files only) and the contracts."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "*.json"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    return tmp_path


def test_the_contracts_hold(tree: Path) -> None:
    proc = lint_imports(tree)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("kernels/vq_reference.py", "import rsavq_core.config.quant_config", KERNELS),
        ("rsavq_core/pipeline/quantize.py", "import service.settings", LIBRARY),
        ("rsavq_core/models/memory.py", "import fastapi", LIBRARY),
        ("service/api/routes/jobs.py", "import worker.runner", SERVICE),
        ("worker/tasks.py", "import service.api.app", WORKER),
        ("service/jobs.py", "import service.api.schemas.jobs", LAYERS),
        ("rsavq_core/formats/base.py", "import rsavq_core.pipeline.quantize", CORE),
        ("rsavq_core/calibration/cache.py", "import rsavq_core.methods.registry", CORE),
        ("rsavq_core/errors.py", "import rsavq_core.settings", CORE),
    ],
)
def test_a_violation_breaks_its_contract(tree: Path, module: str, line: str, contract: str) -> None:
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}  # a deliberate violation\n")
    proc = lint_imports(tree)
    assert proc.returncode != 0
    report = " ".join(proc.stdout.split())  # the tool wraps long contract names
    assert f"{contract} BROKEN" in report, proc.stdout


@pytest.mark.parametrize("package", ["service", "rsavq_core"])
def test_a_new_top_level_module_must_be_placed_in_a_layer(tree: Path, package: str) -> None:
    (tree / package / "newthing.py").write_text('"""Not in any layer of the contract."""\n')
    proc = lint_imports(tree)
    assert proc.returncode != 0 and "newthing" in proc.stdout + proc.stderr
