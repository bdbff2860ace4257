"""Whole runs as JSON summaries: quantize-and-evaluate, the ablation, provenance, replay, tables."""
