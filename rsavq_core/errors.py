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
      + ServiceError            errors of the job service (service/, worker/), by HTTP meaning:
          + AuthenticationError     missing, unknown or revoked API key          (401)
          + NotFoundError           no such job for this tenant                  (404)
          + ConflictError           wrong state for the request, key reuse, ... (409)
          + PayloadTooLargeError    request body over the configured limit       (413)
          + UnavailableError        database or broker unreachable               (503)

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


class ServiceError(RSAVQError):
    """Errors of the job service. ``service.errors`` maps each subclass to one HTTP status."""


class AuthenticationError(ServiceError):
    """Missing, malformed, unknown or revoked API key."""


class NotFoundError(ServiceError):
    """The resource does not exist, or belongs to another tenant (never say which)."""


class ConflictError(ServiceError):
    """The request conflicts with the resource's state (artifact of an unfinished job, reused key)."""


class PayloadTooLargeError(ServiceError):
    """The request body is larger than the configured limit."""


class UnavailableError(ServiceError):
    """A backing service (database, broker) is unreachable."""
