"""Quantization methods, one module each; the registry that finds them by name is ``registry``.

Importing the package registers the built-in methods, in the order users see them listed.
"""

import importlib

for _builtin in ("rsavq", "kmeans", "rtn", "gptq"):
    importlib.import_module(f"{__name__}.{_builtin}")
