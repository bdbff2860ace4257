"""Other libraries loading our checkpoints: transformers' ``from_pretrained``."""
