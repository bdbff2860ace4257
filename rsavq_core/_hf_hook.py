"""Registers ``rsavq_core.hf_integration`` with transformers when ``transformers.quantizers`` is
imported (at once if it already is), without importing transformers or torch here: the API
process imports ``rsavq_core`` and must stay torch-free."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

TARGET = "transformers.quantizers.auto"


def _register() -> None:
    from rsavq_core.hf_integration import register

    register()


class _Loader(importlib.abc.Loader):
    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.wrapped.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.wrapped.exec_module(module)
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    """Finds ``transformers.quantizers.auto`` as usual, then registers once it has executed."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # once, and so that the search below does not find us again
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
