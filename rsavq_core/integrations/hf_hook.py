"""Registers ``rsavq_core.integrations.hf_quantizer`` with transformers when ``transformers.quantizers`` is
imported (at once if it already is), without importing transformers or torch here: the API
process imports ``rsavq_core`` and must stay torch-free."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Any

TARGET = "transformers.quantizers.auto"
QUANTIZER = "rsavq_core.integrations.hf_quantizer"


def _register() -> None:
    """Register with transformers; a failure must not break transformers itself, only our loading."""
    if QUANTIZER in sys.modules and not hasattr(sys.modules[QUANTIZER], "register"):
        return  # imported first, it is importing transformers now: it registers itself once loaded
    try:
        from rsavq_core.integrations.hf_quantizer import register

        register()
    except Exception as exc:  # any failure here would otherwise fail transformers' import
        message = f"rsavq: could not register with transformers ({exc}); from_pretrained will not load artifacts"
        warnings.warn(message, stacklevel=2)


class _Loader(importlib.abc.Loader):
    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self.wrapped.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        self.wrapped.exec_module(module)
        _register()

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader...: the wrapped loader's
        return getattr(self.wrapped, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds ``transformers.quantizers.auto`` as usual, then registers once it has executed."""

    searching = False

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET or self.searching:
            return None
        # Not removed from sys.meta_path here (the import system is iterating it): a re-import or a
        # reload registers again, which register() makes harmless.
        self.searching = True
        try:
            spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        finally:
            self.searching = False
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
