"""Models: resolving an id to a local checkpoint, loading it, its decoder blocks, the memory a job needs."""
