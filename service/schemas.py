"""Request and response bodies. Unknown fields are rejected (422) everywhere.

The algorithm knobs are generated from ``QuantConfig``'s fields, so the API offers exactly the
knobs the library has, each documented in the OpenAPI schema; cross-field rules (bits per method,
vector length vs PQ, ...) are QuantConfig's own and surface as a 422 with its message.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from rsavq_core.config import MAX_BITS, METHODS, MIN_BITS, ZERO_SHOT_TASKS, QuantConfig

_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "int | None": int | None}
# A hub id ("org/name", "name") or a built-in alias: letters, digits, "-", "_", "." and one "/".
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


def _quant_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(QuantConfig):
        if f.name in ("method", "bits"):
            continue  # top-level fields of the job
        fields[f.name] = (
            _TYPES[str(f.type)] | None,
            Field(None, description=f"QuantConfig.{f.name} (default {f.default!r})"),
        )
    return fields


class EvalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    perplexity: bool = Field(True, description="FP and quantized perplexity on wiki-holdout-512")
    zero_shot: list[Literal[ZERO_SHOT_TASKS]] | Literal["all"] | None = Field(  # type: ignore[valid-type]
        None, description="zero-shot tasks to score (slow: minutes per task on a CPU)"
    )
    limit: int | None = Field(None, ge=1, description="first N items of each zero-shot task")
    windows: int | None = Field(None, ge=1, description="first N perplexity windows (default: all)")


QuantOptions = create_model("QuantOptions", __config__=ConfigDict(extra="forbid"), **_quant_fields())


class JobOptions(QuantOptions):  # type: ignore[misc, valid-type]
    evaluation: EvalOptions = Field(default_factory=EvalOptions)


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: str = Field(..., min_length=1, max_length=512, examples=["smollm2-135m"])
    bits: float = Field(..., ge=MIN_BITS, le=MAX_BITS, description="target average bits per weight")
    method: Literal[METHODS] = "rsavq"  # type: ignore[valid-type]
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

    @field_validator("model_id")
    @classmethod
    def _no_traversal(cls, value: str) -> str:
        if ".." in value.split("/") or "\\" in value or "\x00" in value:
            raise ValueError("model_id must not contain '..' segments, backslashes or NUL")
        return value

    def quant_config(self) -> QuantConfig:
        """The validated QuantConfig of this request (raises ConfigError)."""
        knobs = {k: v for k, v in self.options.model_dump(exclude={"evaluation"}).items() if v is not None}
        return QuantConfig.for_method(self.method, bits=self.bits, **knobs)


class Progress(BaseModel):
    stage: str
    done: int
    total: int
    percent: float
    eta_seconds: float | None


class JobOut(BaseModel):
    id: str
    name: str | None = None
    status: str
    model_id: str
    method: str
    bits: float
    options: dict[str, Any]
    progress: Progress
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


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page")
