"""Every knob of a quantization run, in one frozen, validated dataclass.

The spec's inferred ([I]) choices are made here, each with the section of
``shared/docs/rsavq_spec.md`` that discusses it. ``QuantConfig.for_method`` gives the preset of
each method so that the ablation rows differ only in the knobs the paper's ablation changes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from rsavq_core.errors import ConfigError

MethodName = Literal["rsavq", "kmeans", "rtn", "gptq"]
METHODS: tuple[str, ...] = ("rsavq", "kmeans", "rtn", "gptq")
VQ_METHODS: tuple[str, ...] = ("rsavq", "kmeans")

Allocation = Literal["proportional", "additive", "uniform"]
Sensitivity = Literal["inverse", "direct"]
Metric = Literal["fisher_diag", "hessian", "euclidean"]
Assign = Literal["shifted", "paper"]
FisherForm = Literal["exact", "kfac"]

# Codebooks of 2^(bits * d) entries: beyond 2^16 a k-means over them is neither fast nor useful.
MAX_INDEX_BITS = 16
MIN_BITS, MAX_BITS = 1.0, 8.0
# The paper's five zero-shot tasks (here, not in evaluation/, so torch-free callers can validate names).
ZERO_SHOT_TASKS: tuple[str, ...] = ("arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande")


@dataclass(frozen=True)
class QuantConfig:
    """All algorithm parameters of one run. Validated on construction (``ConfigError``)."""

    method: str = "rsavq"
    # Target average bits per weight. With budget="index" (the paper's accounting) it is spent on
    # indices (scalar methods: on codes) and the effective bpw, which adds codebooks, permutation
    # and scales, is reported separately; with budget="effective" (VQ methods) every stored bit of
    # a layer counts, so the reported effective bpw is at most ``bits``.
    bits: float = 2.0
    budget: str = "index"

    # --- vector quantization (rsavq, kmeans) -------------------------------------------------
    vector_len: int = 6  # v: [P §5] main config
    n_pq: int = 2  # sub-vectors per vector; d = v / n_pq = 3 [I, spec §5.4 / §9.2]
    n_groups: int = 4  # WCSG channel groups G [P §5]
    lam: float = 0.05  # EDSG projection strength λ [P A.10]
    # How λ is scaled (spec §6.5: λ is not scale-free). "relative": the shift λ·ñ is rescaled so
    # that ‖shift‖_F = λ·‖W‖_F, i.e. λ is a relative step size; "raw": W − λñ literally. With the
    # per-sequence empirical Fisher and a mean loss, raw ‖ñ‖ measured 10^4-10^5 × ‖W‖ on SmolLM2,
    # which makes every paper-grid λ destroy the layer.
    lam_scale: str = "relative"
    # Bit rule of WCSG: the paper's proportional rule [P-Alg1], the reverse water-filling
    # rule its own Lagrangian gives (spec §5.2), or uniform bits (no WCSG).
    allocation: str = "proportional"
    # I_c = ½ gᵀF⁻¹g (paper Alg.1 / A.7) or ½ gᵀF g (third-party summaries), spec §5.1.
    sensitivity: str = "inverse"
    # Metric of the codebook objective, spec §6.2: Fisher diagonal (EDSG's Fisher norm),
    # VPTQ's Hessian diagonal, or plain Euclidean (the k-means baseline).
    metric: str = "fisher_diag"
    # Assignment target: "shifted" is the consistent Lloyd step on W - λñ under the metric
    # (spec §6.3, recommended); "paper" is Alg.1 line 25 literally (Euclidean, unshifted W).
    assign: str = "shifted"
    kmeans_iters: int = 10  # T codebook updates (closed form, spec §6.4); the paper gives no T [I]
    # Lloyd rounds run on a random subsample of max(this, 8·K) sub-vectors, then one round on all
    # of them (0 = always all). Measured in the README: the full-data rounds dominated CPU time.
    kmeans_fit_points: int = 4096
    compensate: bool = False  # VPTQ-style column-wise error compensation (spec §7)
    min_group_bits: int | None = None  # clamps of the per-group bits; None = derived from bits
    max_group_bits: int | None = None

    # --- calibration statistics --------------------------------------------------------------
    fisher: str = "exact"  # per-sequence gradient factors [P A.9] or textbook K-FAC (spec §3.3)
    damping: float = 0.01  # α of the Fisher factors' Tikhonov damping (spec §3.3)
    hessian_damping: float = 0.01  # GPTQ/VPTQ percdamp for the activation Hessian
    # 32 windows of 512 tokens: the eval protocol lets a job choose N; 128 windows would cost
    # about 10 minutes of backward passes alone on 2 CPU cores (measured in the README).
    calib_samples: int = 32
    calib_len: int = 512

    # --- scalar baselines (rtn, gptq) --------------------------------------------------------
    group_size: int = 64  # input channels sharing one fp16 scale and zero point
    gptq_block: int = 128

    seed: int = 0

    def __post_init__(self) -> None:
        def bad(message: str) -> ConfigError:
            return ConfigError(message)

        if self.method not in METHODS:
            raise bad(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not isinstance(self.bits, (int, float)) or not math.isfinite(self.bits):
            raise bad(f"bits must be a number, got {self.bits!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise bad(f"bits must lie in [{MIN_BITS:g}, {MAX_BITS:g}], got {self.bits:g}")
        _choice("lam_scale", self.lam_scale, ("relative", "raw"))
        _choice("budget", self.budget, ("index", "effective"))
        _choice("allocation", self.allocation, ("proportional", "additive", "uniform"))
        _choice("sensitivity", self.sensitivity, ("inverse", "direct"))
        _choice("metric", self.metric, ("fisher_diag", "hessian", "euclidean"))
        _choice("assign", self.assign, ("shifted", "paper"))
        _choice("fisher", self.fisher, ("exact", "kfac"))
        if (
            not isinstance(self.kmeans_fit_points, int)
            or isinstance(self.kmeans_fit_points, bool)
            or self.kmeans_fit_points < 0
        ):
            raise bad(f"kmeans_fit_points must be a non-negative integer, got {self.kmeans_fit_points!r}")
        for name in (
            "vector_len",
            "n_pq",
            "n_groups",
            "kmeans_iters",
            "calib_samples",
            "calib_len",
            "group_size",
            "gptq_block",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(f"{name} must be a positive integer, got {value!r}")
        if self.vector_len % self.n_pq:
            raise bad(
                f"vector_len {self.vector_len} is not divisible by n_pq {self.n_pq}: "
                f"each vector must split into {self.n_pq} equal sub-vectors"
            )
        if self.calib_len < 2:
            raise bad("calib_len must be at least 2 tokens")
        if not 0.0 <= self.lam <= 10.0:
            raise bad(f"lam must lie in [0, 10], got {self.lam}")
        for name in ("damping", "hessian_damping"):
            if not 0.0 < getattr(self, name) <= 10.0:
                raise bad(f"{name} must lie in (0, 10], got {getattr(self, name)}")
        if self.method in VQ_METHODS:
            if self.bits * self.sub_dim > MAX_INDEX_BITS + 1e-9:
                raise bad(
                    f"{self.bits:g} bits with sub-vectors of {self.sub_dim} needs codebooks of "
                    f"2^{self.bits * self.sub_dim:g} entries; at most 2^{MAX_INDEX_BITS} are "
                    f"supported: lower bits or use a shorter vector_len / more n_pq"
                )
            lo, hi = self.group_bit_range()
            if lo > hi:
                raise bad(f"min_group_bits {lo} exceeds max_group_bits {hi}")
            if not lo <= self.bits <= hi:
                raise bad(f"bits {self.bits:g} is outside the per-group range [{lo}, {hi}]")
        elif self.bits != int(self.bits):
            raise bad(f"method {self.method} needs integer bits, got {self.bits:g}")

    @property
    def sub_dim(self) -> int:
        """Length d of one product-quantization sub-vector."""
        return self.vector_len // self.n_pq

    def group_bit_range(self) -> tuple[int, int]:
        """Clamps [lo, hi] of the per-group bits (spec §5.3 'budget repair and clamps').

        Derived defaults reproduce the spec's examples: [1, 4] at 2 bits, [2, 6] at 4 bits; never 0
        bits (a dropped channel group) and never a codebook above 2^MAX_INDEX_BITS entries.
        """
        cap = MAX_INDEX_BITS // self.sub_dim
        lo = self.min_group_bits if self.min_group_bits is not None else max(1, math.ceil(self.bits) - 2)
        hi = self.max_group_bits if self.max_group_bits is not None else math.floor(self.bits) + 2
        return max(1, lo), min(cap, hi)

    @classmethod
    def for_method(cls, method: str, **overrides: Any) -> QuantConfig:
        """The preset of a method, with explicit overrides applied on top.

        ``kmeans`` is the paper's plain baseline (λ = 0, uniform bits, Euclidean metric, no
        compensation) in the same engine as ``rsavq``.
        """
        presets: dict[str, dict[str, Any]] = {
            "rsavq": {},
            "kmeans": {"lam": 0.0, "allocation": "uniform", "metric": "euclidean", "compensate": False},
            "rtn": {},
            "gptq": {},
        }
        if method not in presets:
            raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        return cls(**{"method": method, **presets[method], **overrides})

    def replace(self, **changes: Any) -> QuantConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**data)

    def needs_gradients(self) -> bool:
        """Whether the run needs the gradient/Fisher statistics (and hence backward passes)."""
        if self.method in ("rtn", "gptq"):
            return False
        return self.lam > 0 or self.allocation != "uniform" or self.metric == "fisher_diag"

    def needs_hessian(self) -> bool:
        return self.method == "gptq" or self.compensate or self.metric == "hessian"

    def needs_calibration(self) -> bool:
        return self.needs_gradients() or self.needs_hessian()


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
