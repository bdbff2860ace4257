"""Run configuration: the knobs, ``QuantConfig`` and presets. Torch-free (the API validates with it)."""
