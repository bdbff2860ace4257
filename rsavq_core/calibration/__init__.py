"""Calibration: per-layer statistics computed block by block (``statistics``) and their on-disk
cache (``cache``). The calibration text itself comes from ``rsavq_core.data.windows``."""
