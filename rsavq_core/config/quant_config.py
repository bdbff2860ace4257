"""The configuration of one quantization run: the method, the bit budget, calibration, the method's options.

``QuantConfig`` holds what every method shares (target bits, calibration windows, the Fisher
form, the seed) and ``options``, the chosen method's own frozen dataclass (``rsavq_core.methods``).
Its flat form (``to_dict`` / ``for_method``: ``{"method": ..., "bits": ..., <knob>: ...}``) is
what the command line, the API and the packed checkpoint's metadata use. Everything is validated on
construction (``ConfigError``), before any heavy work.

Torch-free: the API process imports this to validate requests.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from rsavq_core.config.knobs import MethodOptions, knob, knobs, validate_knobs
from rsavq_core.config.presets import PRESETS
from rsavq_core.errors import ConfigError
from rsavq_core.methods.registry import get_method, method_names, option_knobs, option_names

log = logging.getLogger(__name__)

MIN_BITS, MAX_BITS = 1.0, 8.0
# The paper's five zero-shot tasks (here, not in evaluation/, so torch-free callers can validate names).
ZERO_SHOT_TASKS: tuple[str, ...] = ("arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande")
FisherForm = Literal["exact", "kfac"]
CalibSampling = Literal["random", "first"]
CalibInputs = Literal["fp", "quantized"]
FinetuneTarget = Literal["block", "model"]
OptionsT = TypeVar("OptionsT", bound=MethodOptions)


@dataclass(frozen=True)
class QuantConfig:
    """All parameters of one run. Validated on construction (``ConfigError``)."""

    method: str = "rsavq"
    bits: float = knob(2.0, "target average bits per weight (indices or codes)", ge=MIN_BITS, le=MAX_BITS)
    # 32 windows of 512 tokens: the eval protocol lets a job choose N; 128 windows would cost
    # about 10 minutes of backward passes alone on 2 CPU cores (measured in the README).
    # Upper bounds keep a request from tying up a worker for days (a job runs hours at most).
    calib_samples: int = knob(32, "calibration windows", ge=1, le=4096)
    calib_len: int = knob(512, "tokens per calibration window", ge=2, le=32768)
    calib_sampling: CalibSampling = knob(
        "random", "calibration windows: drawn across the whole calibration split (seeded), or the first in file order"
    )
    calib_inputs: CalibInputs = knob(
        "fp", "inputs behind each block's Hessian: the float model's, or the partly quantized model's (sequential)"
    )
    fisher: FisherForm = knob("exact", "Fisher factors: per-sequence gradients [P A.9] or textbook K-FAC (spec §3.3)")
    # Fine-tuning, codes fixed: block-wise after each block's one-shot pass (rsavq_core/finetune/blockwise.py),
    # then end to end on the float model's logits (rsavq_core/finetune/end_to_end.py).
    # None: the method's own default (QuantMethod.block_finetune_steps): on for RSAVQ, off for the
    # baselines, which stay what their papers and public implementations are.
    block_finetune_steps: int | None = knob(
        None, "block-wise fine-tuning: Adam steps per block (0: off; default: the method's)", ge=0, le=100_000
    )
    block_finetune_lr: float = knob(1e-3, "block-wise fine-tuning: learning rate", gt=0.0, le=1.0)
    # On by measurement (README, "Quality"): at 3 bits 31.56 -> 31.21 for no extra time.
    block_finetune_norms: bool = knob(True, "block-wise fine-tuning: train the block's normalisation weights too")
    # "block": the float block's outputs on what the quantized block receives (AQLM); "model": the
    # float model's own outputs at that block (OmniQuant, EfficientQAT), which also asks each block
    # to undo the error of the quantized blocks before it.
    finetune_target: FinetuneTarget = knob(
        "block", "block-wise fine-tuning: match the float block on the quantized inputs, or the float model"
    )
    model_finetune_steps: int = knob(
        0, "end-to-end fine-tuning (KL to the float model's logits): Adam steps (0: off)", ge=0, le=100_000
    )
    model_finetune_lr: float = knob(1e-4, "end-to-end fine-tuning: learning rate", gt=0.0, le=1.0)
    # One window per step: on 2 CPU cores a step on 4 windows of 512 tokens took about 0.5 s per
    # block and 20 s end to end; more, cheaper steps cover the same windows sooner.
    finetune_batch: int = knob(1, "calibration windows per fine-tuning step (block-wise and end to end)", ge=1, le=4096)
    seed: int = knob(0, "seed of every random choice (k-means initialisation, subsampling)", ge=0, le=2**32 - 1)
    # Off by default, as in every public quantizer: for small models with large vocabularies the
    # embedding is most of the file (rsavq_core/pipeline/embeddings.py; measured in the README).
    embedding_bits: int | None = knob(
        None,
        "also quantize the input embedding and the output head (one matrix when tied) to this many bits, row-wise "
        "scalar codes (off: float16)",
        ge=2,
        le=8,
    )
    # Not a knob: the sha256 of the user's own calibration text (None: the bundled Wikipedia split),
    # set by quantize_model from the text it is given, so an artifact says what it was calibrated on.
    calib_data: str | None = None
    options: MethodOptions | None = None  # the method's options; None = its defaults

    def __post_init__(self) -> None:
        method = get_method(self.method)
        validate_knobs(self)
        if self.options is None:
            object.__setattr__(self, "options", method.options_type())
        elif type(self.options) is not method.options_type:
            raise ConfigError(
                f"method {self.method} takes {method.options_type.__name__}, got {type(self.options).__name__}"
            )
        object.__setattr__(self, "options", method.resolve(self.options_as(method.options_type), self))
        if self.block_finetune_steps is None:
            object.__setattr__(self, "block_finetune_steps", method.block_finetune_steps)
        method.validate(self)

    def options_as(self, cls: type[OptionsT]) -> OptionsT:
        """The options, typed as the method's own class (which the constructor checked)."""
        if not isinstance(self.options, cls):
            raise TypeError(f"method {self.method}'s options are {type(self.options).__name__}, not {cls.__name__}")
        return self.options

    @classmethod
    def for_method(cls, method: str, *, preset: str | None = None, **knobs_: Any) -> QuantConfig:
        """A config from flat knobs: shared ones (``bits``, ``calib_samples``...) and the method's options.

        The method's option defaults are its own (k-means: λ = 0, uniform bits, Euclidean); a
        ``preset`` (``rsavq_core.config.presets``) sets the knobs of it that this method has; explicit
        knobs win over both. A knob the method does not have is an error that says which methods have it.
        """
        chosen = get_method(method)
        shared = {f.name for f in dataclasses.fields(cls)} - {"method", "options"}
        own = set(option_names(chosen))
        if own & shared:  # a method's option may not shadow a shared knob: one flag, one field per name
            raise TypeError(f"method {method} declares shared knob(s) {sorted(own & shared)} as its own options")
        if preset is not None:
            if preset not in PRESETS:
                raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(sorted(PRESETS))}")
            knobs_ = {**{k: v for k, v in PRESETS[preset].items() if k in shared | own}, **knobs_}
        stray = sorted(set(knobs_) - shared - own)
        if stray:
            raise ConfigError(_stray_message(method, stray))
        options = chosen.options_type(**{k: v for k, v in knobs_.items() if k in own})
        return cls(method=method, options=options, **{k: v for k, v in knobs_.items() if k in shared})

    def replace(self, **changes: Any) -> QuantConfig:
        """This config with some flat knobs changed; derived knobs keep the values they resolved to."""
        flat = {**self.to_dict(), **changes}
        return QuantConfig.for_method(flat.pop("method"), **flat)

    def to_dict(self) -> dict[str, Any]:
        """The flat form: the shared fields and the method's options in one mapping. Knobs added
        later (``UNSET_OMITTED``) are left out while unset, so an artifact that does not use them
        keeps the bytes it had before they existed."""
        shared = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "options" and not (f.name in UNSET_OMITTED and getattr(self, f.name) is None)
        }
        return {**shared, **dataclasses.asdict(self.options)} if self.options is not None else shared

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict: bool = True) -> QuantConfig:
        """Inverse of ``to_dict``. ``strict=False`` drops knobs that belong to other methods.

        Non-strict reading is for checkpoints written before each method had its own options, when
        every config listed every knob of every method.
        """
        flat = dict(data)
        method = flat.pop("method", "rsavq")
        if not strict and isinstance(method, str) and method in method_names():
            keep = set(option_names(get_method(method))) | {f.name for f in dataclasses.fields(cls)}
            others = set(option_knobs())
            dropped = sorted(k for k in flat if k not in keep and k in others)
            if dropped:
                log.debug("ignoring knobs of other methods in a %s config: %s", method, ", ".join(dropped))
            flat = {k: v for k, v in flat.items() if k not in dropped}
        return cls.for_method(method, **flat)

    def needs_gradients(self) -> bool:
        """Whether the run needs the gradient/Fisher statistics (and hence backward passes)."""
        return get_method(self.method).statistics(self).gradients

    def needs_hessian(self) -> bool:
        return get_method(self.method).statistics(self).hessian

    def needs_calibration(self) -> bool:
        return get_method(self.method).statistics(self).any


# Knobs a config's flat form leaves out while they are None (see ``QuantConfig.to_dict``).
UNSET_OMITTED = ("embedding_bits",)


# Sections of a job's options that are the job's own, not knobs of the quantization.
JOB_SECTIONS = ("evaluation", "calibration", "allow_partial")


def config_from_job(method: str, bits: float, options: Mapping[str, Any] | None) -> QuantConfig:
    """The ``QuantConfig`` of a job from its method, bits and options (the API's request and the
    stored job alike): every knob given, ``preset`` included; None means not given."""
    knobs_ = {k: v for k, v in (options or {}).items() if k not in JOB_SECTIONS and v is not None}
    return QuantConfig.for_method(method, bits=bits, **knobs_)


def shared_knobs() -> tuple[Any, ...]:
    """The knobs every method shares (``QuantConfig``'s own), ``bits`` included."""
    return knobs(QuantConfig)


def _stray_message(method: str, stray: list[str]) -> str:
    by_method = option_knobs()
    unknown = [k for k in stray if k not in by_method]
    if unknown:
        return f"unknown config field(s): {', '.join(unknown)}"
    owners = "; ".join(f"{k} is an option of {', '.join(m.name for m in by_method[k][1])}" for k in stray)
    return f"method {method} has no option {', '.join(stray)} ({owners})"
