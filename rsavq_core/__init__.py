"""RSAVQ: the quantization library (methods, formats, calibration, evaluation, runtime). See ARCHITECTURE.md.

Importing it also lets transformers load packed checkpoints (``AutoModelForCausalLM.from_pretrained``
on an artifact folder; ``rsavq_core.hf_integration``), registered when transformers' quantizers load.
"""

from rsavq_core import _hf_hook

_hf_hook.install()
