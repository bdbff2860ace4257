"""Operator secrets presented as ``Authorization: Bearer <secret>`` (the generation server's token,
the metrics token): one constant-time check, shared by the API and the worker processes."""

from __future__ import annotations

import hmac


def bearer_matches(authorization: str | None, secret: str) -> bool:
    """Is ``authorization`` the header ``Bearer <secret>`` (scheme case-insensitive)?"""
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), secret.encode())
