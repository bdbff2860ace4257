"""Packed layer formats, one module each (interface in ``base``); the registry that finds a layer's
format by its ``kind`` is ``registry``. Importing the package registers the built-in formats.
"""

from rsavq_core.formats import scalar, vq  # noqa: F401  (each registers its format)
