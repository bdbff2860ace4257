"""Fine-tuning with codes fixed: block-wise and end to end, over one training loop."""
