"""Triton kernels for quantized layers, each with a pure-torch reference: tensors in, tensors out.

Nothing here imports the rest of the project (the import contracts in ``.importlinter`` check it).
"""
