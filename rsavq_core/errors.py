"""The one exception hierarchy of rsavq_core.

Every error the library raises on purpose derives from ``RSAVQError`` so that callers (the CLI,
the worker, the HTTP service) can map them in one place::

    RSAVQError
      + ConfigError             a knob or an input is invalid (bits, vector length, method, ...)
      + ModelResolutionError    a model id could not be resolved to a local checkpoint
      + UnsupportedModelError   the model has no quantizable linear layers / unknown layout
      + UnsupportedShapeError   a tensor shape a routine cannot handle
      + CalibrationError        calibration data or statistics are missing or inconsistent
      + ArtifactError           a packed checkpoint is unreadable (truncated, wrong version, shapes)
      + AssetError              an offline asset package (text, tasks) is not installed
      + InsufficientMemoryError the pre-flight estimate of a job exceeds what a worker can hold
      + JobCancelled            a caller asked a running job to stop (honoured between layers)

The job service extends this hierarchy with its own errors (``service.errors``: authentication,
not found, conflict, ...) and maps the whole of it to HTTP statuses there, once; the library
itself has no notion of HTTP.

``ConfigError`` also derives from ``ValueError`` so that argument validation reads naturally.
"""

from __future__ import annotations


class RSAVQError(Exception):
    """Base class of every error rsavq_core raises on purpose."""


class ConfigError(RSAVQError, ValueError):
    """A configuration value or user input is invalid; raised before any heavy work starts."""


class ModelResolutionError(RSAVQError):
    """A model id could not be resolved; the message lists every place that was tried."""


class UnsupportedModelError(RSAVQError):
    """The model cannot be quantized (e.g. it has no ``nn.Linear`` layers in its decoder blocks)."""


class UnsupportedShapeError(RSAVQError, ValueError):
    """A tensor has a shape that the routine does not support."""


class CalibrationError(RSAVQError):
    """Calibration data or cached statistics are missing, empty or inconsistent."""


class ArtifactError(RSAVQError):
    """A packed checkpoint is malformed: truncated, of an unknown format version, or inconsistent."""


class AssetError(RSAVQError):
    """An offline asset (bundled model, text or zero-shot tasks) is not installed."""


class InsufficientMemoryError(RSAVQError):
    """A job's estimated peak memory exceeds the capacity of every worker; the message has the figures."""


class JobCancelled(RSAVQError):
    """Raised from a progress callback when the job was cancelled; the pipeline stops between layers."""
