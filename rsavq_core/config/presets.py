"""Named sets of knob values: what ``--preset NAME`` (and the API's ``options.preset``) applies
under the knobs given explicitly, which always win. A preset is not recorded as such: the run's
config records the knob values it produced. Torch-free (the API validates with it).

``fast``: the default method without the fine-tunings and with half the calibration windows:
minutes instead of tens of minutes on a CPU, at the quality measured in the README.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"calib_samples": 16, "block_finetune_steps": 0, "model_finetune_steps": 0},
}
