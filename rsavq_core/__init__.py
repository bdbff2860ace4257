"""RSAVQ: the quantization library (methods, formats, calibration, evaluation, runtime). See ARCHITECTURE.md."""
