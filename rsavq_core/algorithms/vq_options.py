"""The options of the vector-quantization engine (RSAVQ and its k-means baseline), with the
constants their derived defaults follow (``RSAVQ.resolve`` derives them)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, TypeVar

from rsavq_core.config.knobs import MethodOptions, knob
from rsavq_core.errors import ConfigError

# Codebooks of 2^(bits * d) entries: beyond 2^16 a k-means over them is neither fast nor useful.
MAX_INDEX_BITS = 16
# The derived sub-vector length keeps codebooks at or below this many entries: a layer stores its
# codebooks in fp16 per channel group, and on 576-wide layers 512-entry codebooks of 3-dim
# sub-vectors cost 0.1-0.6 bpw (3-bit RSAVQ spent 3.497 bpw with the paper's 2 x 3 layout, 3.075
# with 3 x 2), while 64 entries cost under 0.1 bpw there and nothing on large layers.
AUTO_MAX_ENTRIES = 64
# Per-layer layout: the paper's vector length and WCSG's channel groups.
PER_LAYER_VECTOR_LEN = 6
PER_LAYER_GROUPS = 4
# Shared codebooks have 2^12 entries, the size measured (README; AQLM's 2^16-entry codebooks were
# not): shared by the 30 blocks of SmolLM2-135M they cost 0.026 bpw at 2 bits, less on larger models.
SHARED_INDEX_BITS = 12
DEFAULT_OUTLIERS = 0.0005

Budget = Literal["index", "effective"]
LamScale = Literal["relative", "raw"]
Allocation = Literal["proportional", "additive", "uniform"]
Sensitivity = Literal["inverse", "direct"]
Metric = Literal["fisher_diag", "hessian", "euclidean"]
Assign = Literal["shifted", "paper"]
Refit = Literal["mean", "output"]


@dataclass(frozen=True)
class VQOptions(MethodOptions):
    """Options of the vector-quantization engine."""

    # budget="index" is the paper's accounting: bits are spent on indices and the effective bpw,
    # which adds codebooks, permutation and scales, is reported separately; with "effective"
    # every stored bit of a layer counts, so the reported effective bpw is at most ``bits``.
    budget: Budget = knob("index", "what --bits counts: index bits (paper) or every stored bit, codebooks included")
    vector_len: int | None = knob(
        None,
        f"vector length v, in output rows [P §5] (default: {SHARED_INDEX_BITS} / bits with shared codebooks, "
        f"else {PER_LAYER_VECTOR_LEN})",
        ge=1,
        le=64,
    )
    n_pq: int | None = knob(
        None,
        "product-quantization sub-vectors per vector, d = v / n_pq [I, spec §5.4 / §9.2] "
        "(default: 1 with shared codebooks, else the longest sub-vector whose codebook has at most "
        f"{AUTO_MAX_ENTRIES} entries at --bits)",
        ge=1,
        le=64,
    )
    n_groups: int | None = knob(
        None,
        f"WCSG channel groups G [P §5] (default: 1 with shared codebooks, else {PER_LAYER_GROUPS})",
        ge=1,
        le=256,
    )
    lam: float = knob(0.05, "EDSG projection strength λ [P A.10]", ge=0.0, le=10.0)
    # Spec §6.5: λ is not scale-free. With the per-sequence empirical Fisher and a mean loss, raw
    # ‖ñ‖ measured 10^4-10^5 × ‖W‖ on SmolLM2, which makes every paper-grid λ destroy the layer.
    lam_scale: LamScale = knob(
        "relative", "relative: the EDSG shift is rescaled so that ‖shift‖ = λ‖W‖; raw: W − λñ literally"
    )
    # Uniform by measurement (README, "Quality"): under the full default at 3 bits, WCSG's
    # proportional rule gave 31.21 at 3.0753 bpw and uniform bits 29.28 at 3.0712; in the one-shot
    # ablation rows too WCSG made it worse (48.69 -> 55.07). ``--allocation proportional`` is the paper's.
    allocation: Allocation = knob(
        "uniform", "WCSG bit rule: the paper's proportional rule, reverse water-filling (spec §5.2), or none"
    )
    sensitivity: Sensitivity = knob("inverse", "I_c = ½ gᵀF⁻¹g (paper Alg. 1 / A.7) or ½ gᵀF g (spec §5.1)")
    metric: Metric = knob(
        "fisher_diag", "codebook metric (spec §6.2): Fisher diagonal (EDSG), VPTQ's Hessian diagonal, or Euclidean"
    )
    assign: Assign = knob(
        "shifted", "assignment target: the Lloyd step on W − λñ (spec §6.3) or Alg. 1 line 25 literally"
    )
    kmeans_iters: int = knob(10, "codebook updates T (closed form, spec §6.4); the paper gives no T [I]", ge=1, le=1000)
    # Measured in the README: the full-data rounds dominated CPU time.
    kmeans_fit_points: int = knob(
        4096,
        "Lloyd rounds run on max(this, 8·K) sampled sub-vectors, then one on all (0 = always all)",
        ge=0,
        le=10**8,
    )
    # Error feedback and the output-error refit are on by default: measured on SmolLM2-135M at 3
    # bits (README, "Quality"): 3.075 bpw, perplexity 40.51 with compensation, 37.92 with the refit too.
    compensate: bool = knob(True, "VPTQ-style column-wise error compensation (spec §7)")
    refit: Refit = knob(
        "output",
        "final codebooks: mean of what each entry was assigned (spec §7 step 4; after compensation only), "
        "or least squares on the output error tr(ΔW H ΔWᵀ) with codes fixed (GPTVQ)",
    )
    # On by measurement (README, "Quality"): full default at 3 bits 29.28 -> 28.21 (3.071 -> 3.095 bpw),
    # at 2 bits 66.09 -> 59.13 (2.071 -> 2.095); 16 bits per output row (0.028 bpw on 576-wide layers).
    row_scales: bool = knob(
        True, "one fp16 scale per output row (AQLM): codebooks quantize W / s, trained with them when fine-tuning"
    )
    # 0.05 % by measurement (README, "Quality"): each outlier costs 48 bits, 0.024 bpw in all; per
    # layer at 2 bits 59.13 -> 51.21 (2.072 -> 2.096 bpw); with shared codebooks see below.
    outliers: float | None = knob(
        None,
        "share of each layer's weights kept exact as sparse fp16 residuals (SpQR), chosen by w² times "
        f"the input channel's Hessian diagonal (or the run's metric) (default {DEFAULT_OUTLIERS})",
        ge=0.0,
        le=0.05,
    )
    # Derived by measurement (README, "Codebooks shared across the blocks"): on the layout alone
    # shared was no better (2 bits: 58.51 / 59.76 at 2.049 bpw, seeds 0 / 1, against the per-layer
    # 59.13 / 56.82 at 2.072), but it costs less, and with the saved bits spent on outliers it won
    # at equal bpw: 47.49 at 2.073 and 25.75 at 3.069 against 59.13 at 2.072 and 28.18 at 3.072.
    share_codebooks: bool | None = knob(
        None,
        f"one set of 2^{SHARED_INDEX_BITS}-entry codebooks per layer type (every block's q_proj, ...), fitted on "
        "all of them before the per-block pass; codes, row scales and outliers stay per layer; needs uniform "
        "allocation, whole bits, --budget index and --calib-inputs fp (default: on where those hold, at 1 to 4 bits, "
        "with the layout (vector_len, n_pq, n_groups) left to derive)",
    )
    min_group_bits: int | None = knob(
        None, "lowest bits of a channel group (default: derived from --bits)", ge=1, le=16
    )
    max_group_bits: int | None = knob(
        None, "highest bits of a channel group (default: derived from --bits)", ge=1, le=16
    )
    damping: float = knob(0.01, "α of the Fisher factors' Tikhonov damping (spec §3.3)", gt=0.0, le=10.0)
    hessian_damping: float = knob(0.01, "percent damping of the activation Hessian (GPTQ / VPTQ)", gt=0.0, le=10.0)
    # The compensation feeds error forward over H like GPTQ, and so has GPTQ's attention-sink problem.
    sink_share: float = knob(
        0.1, "least share of the Hessian's trace the windows' first tokens (the attention sink) carry", ge=0.0, le=0.9
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_split()

    def check_split(self) -> None:
        """Vectors split into n_pq equal sub-vectors, once both are known (given, or resolved)."""
        if self.n_pq is not None and self.vector_len is not None and self.vector_len % self.n_pq:
            raise ConfigError(
                f"vector_len {self.vector_len} is not divisible by n_pq {self.n_pq}: "
                f"each vector must split into {self.n_pq} equal sub-vectors"
            )

    # The derived knobs, once resolved (``RSAVQ.resolve``; a QuantConfig's options always are).
    @property
    def sub_dim(self) -> int:
        """Length d of one product-quantization sub-vector."""
        return self.vector_length // self.sub_vectors

    @property
    def sub_vectors(self) -> int:
        """``n_pq``."""
        return _resolved(self.n_pq, "n_pq")

    @property
    def vector_length(self) -> int:
        """``vector_len``."""
        return _resolved(self.vector_len, "vector_len")

    @property
    def channel_groups(self) -> int:
        """``n_groups``."""
        return _resolved(self.n_groups, "n_groups")

    @property
    def outlier_share(self) -> float:
        """``outliers``."""
        return _resolved(self.outliers, "outliers")

    @property
    def shared(self) -> bool:
        """``share_codebooks``."""
        return _resolved(self.share_codebooks, "share_codebooks")

    def group_bit_range(self, bits: float) -> tuple[int, int]:
        """Clamps [lo, hi] of the per-group bits at a target of ``bits`` (spec §5.3 'budget repair and clamps').

        Derived defaults reproduce the spec's examples: [1, 4] at 2 bits, [2, 6] at 4 bits; never 0
        bits (a dropped channel group) and never a codebook above 2^MAX_INDEX_BITS entries.
        """
        cap = MAX_INDEX_BITS // self.sub_dim
        lo = self.min_group_bits if self.min_group_bits is not None else max(1, math.ceil(bits) - 2)
        hi = self.max_group_bits if self.max_group_bits is not None else math.floor(bits) + 2
        return max(1, lo), min(cap, hi)


T = TypeVar("T")


def _resolved(value: T | None, name: str) -> T:
    if value is None:
        raise ConfigError(f"{name} is derived from the bits: read it from a QuantConfig's options")
    return value
