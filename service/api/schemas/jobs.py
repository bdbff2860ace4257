"""Request and response bodies. Unknown fields are rejected (422) everywhere, and request types
are strict: ``true`` or ``"2"`` is not a number, ``3.0`` is not a count (422, not coerced).

The algorithm knobs are generated from the knobs of ``QuantConfig`` and of every registered
method's options, so the API offers exactly the knobs the library has, each documented in the
OpenAPI schema with its bounds and choices; a knob the chosen method does not have, and the rules
between knobs (bits per method, vector length vs PQ, ...), are QuantConfig's own and surface as a
422 with its message.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, field_validator

from rsavq_core.config.knobs import Knob
from rsavq_core.config.presets import PRESETS
from rsavq_core.config.quant_config import (
    MAX_BITS,
    MIN_BITS,
    ZERO_SHOT_TASKS,
    QuantConfig,
    config_from_job,
    shared_knobs,
)
from rsavq_core.methods.registry import describe_option, method_names, methods, option_knobs

# A hub id ("org/name", "name") or a built-in alias: letters, digits, "-", "_", "." and one "/".
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


def _field(k: Knob, description: str) -> tuple[Any, Any]:
    """The request field of one knob: optional (None = the method's default), bounds and choices in the schema."""
    # Choices come from the knob's type, so the Literal is built at run time.
    kind: Any = Literal[k.choices] if k.choices is not None else k.base
    return kind | None, Field(None, ge=k.ge, gt=k.gt, le=k.le, description=description)


def _quant_fields() -> dict[str, Any]:
    """Every shared knob but ``bits`` (top level) and every method's options, one field per name."""
    fields = {k.name: _field(k, f"{k.help} [all methods; default {k.default!r}]") for k in shared_knobs()}
    fields.pop("bits")
    fields.update({name: _field(k, describe_option(name)) for name, (k, _) in option_knobs().items()})
    fields["preset"] = (
        Literal[tuple(sorted(PRESETS))] | None,
        Field(None, description="named knob values (the knobs given here win): " + json.dumps(PRESETS)),
    )
    return fields


STRICT = ConfigDict(extra="forbid", strict=True)


def as_utc(value: dt.datetime | None) -> dt.datetime | None:
    """The database keeps UTC without an offset; the API says so (RFC 3339 date-time)."""
    return value.replace(tzinfo=dt.UTC) if value is not None and value.tzinfo is None else value


MAX_EVAL_DATASETS = 8


def no_traversal(value: str) -> str:
    if ".." in value.split("/") or "\\" in value or "\x00" in value:
        raise ValueError("model_id must not contain '..' segments, backslashes or NUL")
    return value


# A job's and a sweep's model: a hub id, an alias, or (where allowed) an absolute local path.
ModelId = Annotated[str, Field(min_length=1, max_length=512, examples=["smollm2-135m"]), AfterValidator(no_traversal)]


class EvalOptions(BaseModel):
    model_config = STRICT
    perplexity: bool = Field(True, description="FP and quantized perplexity on wiki-holdout-512")
    # A Literal of a tuple constant: valid at run time, not a literal type to mypy.
    zero_shot: list[Literal[ZERO_SHOT_TASKS]] | Literal["all"] | None = Field(  # type: ignore[valid-type]
        None, description="zero-shot tasks to score (slow: minutes per task on a CPU)"
    )
    limit: int | None = Field(None, ge=1, le=100_000, description="first N items of each zero-shot task")
    windows: int | None = Field(None, ge=1, le=100_000, description="first N perplexity windows (default: all)")
    datasets: list[str] | None = Field(
        None,
        max_length=MAX_EVAL_DATASETS,
        description="dataset ids (POST /v1/datasets): the perplexity on each of these texts too",
    )


class CalibrationData(BaseModel):
    model_config = STRICT
    dataset: str | None = Field(
        None, description="a dataset id (POST /v1/datasets) to calibrate on instead of the bundled text"
    )
    allow_overlap: bool = Field(
        False, description="allow evaluation datasets that share documents with the calibration dataset"
    )


QuantOptions = create_model("QuantOptions", __config__=STRICT, **_quant_fields())


class JobOptions(QuantOptions):
    evaluation: EvalOptions = Field(default_factory=EvalOptions)
    calibration: CalibrationData | None = Field(None, description="your own calibration text")
    allow_partial: bool = Field(
        False,
        description="quantize a model whose linears hold under 90% of its decoder blocks' weights "
        "(the job's metrics list what stayed in float); refused otherwise",
    )


class JobRequest(BaseModel):
    model_config = STRICT
    model_id: ModelId
    bits: float = Field(..., ge=MIN_BITS, le=MAX_BITS, description="target average bits per weight")
    # The registry's names at import time: a run-time Literal, not a literal type to mypy.
    method: Literal[method_names()] = Field(  # type: ignore[valid-type]
        "rsavq", description="quantization method: " + "; ".join(f"{m.name}: {m.summary}" for m in methods())
    )
    name: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$",
        description="a name for the result: /v1/completions accepts it as `model` "
        "(the latest succeeded job of that name)",
        examples=["smol-2bit"],
    )
    options: JobOptions = Field(default_factory=JobOptions)

    def quant_config(self) -> QuantConfig:
        """The validated QuantConfig of this request (raises ConfigError)."""
        return config_from_job(self.method, self.bits, self.options.model_dump())


class JobProgress(BaseModel):
    stage: str
    done: int
    total: int
    percent: float
    eta_seconds: float | None
    detail: dict[str, float] | None = Field(None, description="what the stage measures as it goes, e.g. loss")


class JobOut(BaseModel):
    id: str
    name: str | None = None
    status: str
    model_id: str
    method: str
    bits: float
    options: dict[str, Any]
    progress: JobProgress
    effective_bpw: float | None
    error: str | None
    attempts: int
    cancel_requested: bool
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    updated_at: dt.datetime
    layers: list[dict[str, Any]] | None = Field(None, description="per-layer bits and proxy error")
    links: dict[str, str]

    _utc = field_validator("created_at", "started_at", "finished_at", "updated_at")(as_utc)


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page")


MAX_SWEEP_BUDGETS = 8


class SweepRequest(BaseModel):
    model_config = STRICT
    model_id: ModelId
    bits: list[float] = Field(
        ...,
        min_length=2,
        max_length=MAX_SWEEP_BUDGETS,
        description=f"the budgets: one job each, {MIN_BITS}-{MAX_BITS} bits per weight, no repeats",
        examples=[[2, 3, 4]],
    )
    method: Literal[method_names()] = Field("rsavq", description="quantization method, as for a job")  # type: ignore[valid-type]
    name: str | None = Field(
        None,
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$",
        description="names the jobs <name>-<bits>bit (/v1/completions accepts them as `model`)",
    )
    options: JobOptions = Field(default_factory=JobOptions)

    @field_validator("bits")
    @classmethod
    def _distinct_budgets(cls, value: list[float]) -> list[float]:
        for b in value:
            if not MIN_BITS <= b <= MAX_BITS:
                raise ValueError(f"every budget must lie in [{MIN_BITS:g}, {MAX_BITS:g}] bits per weight, got {b:g}")
        if len(set(value)) != len(value):
            raise ValueError("budgets must not repeat")
        return value

    def jobs(self) -> list[JobRequest]:
        """One job request per budget, in the order given (each validated as a job's own would be)."""
        return [
            JobRequest(
                model_id=self.model_id,
                bits=float(b),
                method=self.method,
                name=None if self.name is None else f"{self.name}-{b:g}bit",
                options=self.options,
            )
            for b in self.bits
        ]


class SweepRow(BaseModel):
    bits: float
    job_id: str | None = Field(None, description="None once the job was deleted")
    status: str
    effective_bpw: float | None = Field(None, description="all-in bits per weight of the quantized layers")
    artifact_bytes: int | None = Field(None, description="all-in size of the published artifact")
    perplexity: float | None = None
    zero_shot: float | None = Field(None, description="average zero-shot accuracy, when evaluated")


class SweepOut(BaseModel):
    id: str
    name: str | None
    model_id: str
    method: str
    status: str = Field(description="queued / running while any job is; then succeeded, failed or mixed")
    created_at: dt.datetime
    rows: list[SweepRow]
    links: dict[str, str]

    _utc = field_validator("created_at")(as_utc)


class SweepList(BaseModel):
    items: list[SweepOut]


class DatasetOut(BaseModel):
    id: str
    name: str
    format: str = Field(description="text (documents at blank lines) or jsonl (a 'text' field per line)")
    size: int = Field(description="bytes")
    sha256: str
    documents: int
    created_at: dt.datetime
    links: dict[str, str]

    _utc = field_validator("created_at")(as_utc)


class DatasetList(BaseModel):
    items: list[DatasetOut]
