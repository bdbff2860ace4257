"""Model id + config -> packed layers: the quantization run in steps, with progress and resume."""
