"""RSAVQ: the quantization library (methods, formats, calibration, evaluation, runtime). See ARCHITECTURE.md.

Importing it also lets transformers load packed checkpoints (``AutoModelForCausalLM.from_pretrained``
on an artifact folder; ``rsavq_core.integrations.hf_quantizer``), registered when transformers'
quantizers load.
"""

from rsavq_core.integrations import hf_hook

hf_hook.install()
