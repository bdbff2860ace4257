"""API keys: random secrets, stored only as their sha256; each key belongs to one tenant."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from rsavq_core.errors import ConfigError
from service.db import ApiKey, utcnow
from service.errors import AuthenticationError, NotFoundError

KEY_PREFIX = "rsavq_"


def hash_key(key: str) -> str:
    # A plain sha256 suffices: keys are 256-bit random secrets, not guessable passwords.
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, name: str, tenant: str | None = None) -> str:
    """Create a key for ``tenant`` (default: ``name``) and return it; it is never shown again."""
    if not name or len(name) > 128:
        raise ConfigError("a key name must have 1 to 128 characters")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant=tenant or name, name=name, key_hash=hash_key(key), prefix=key[:12]))
    session.commit()
    return key


def revoke_key(session: Session, name_or_key: str) -> int:
    """Revoke every live key with this name, or the key itself. Returns how many were revoked."""
    rows = session.scalars(
        select(ApiKey).where(
            ApiKey.revoked_at.is_(None), (ApiKey.name == name_or_key) | (ApiKey.key_hash == hash_key(name_or_key))
        )
    ).all()
    if not rows:
        raise NotFoundError(f"no live API key named {name_or_key!r}")
    for row in rows:
        row.revoked_at = utcnow()
    session.commit()
    return len(rows)


def authenticate(session: Session, authorization: str | None) -> str:
    """The tenant of a ``Bearer KEY`` header; AuthenticationError otherwise."""
    if not authorization:
        raise AuthenticationError("missing Authorization header; send 'Authorization: Bearer <key>'")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise AuthenticationError("malformed Authorization header; expected 'Bearer <key>'")
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key.strip())))
    if row is None:
        raise AuthenticationError("unknown API key")
    if row.revoked_at is not None:
        raise AuthenticationError("this API key has been revoked")
    return row.tenant


class KeyCache:
    """Recently verified keys -> tenant, for ``ttl`` seconds (0 disables it).

    Clients poll job status many times a second; without the cache every poll costs a key lookup.
    The price: a revoked key keeps working for at most ``ttl`` seconds in each API process.
    Only successes are cached, so a new key works at once and failures are always re-checked.
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._tenants: dict[str, tuple[str, float]] = {}

    def tenant(self, session: Session, authorization: str | None) -> str:
        if self.ttl <= 0 or not authorization:
            return authenticate(session, authorization)
        now = time.monotonic()
        with self._lock:
            hit = self._tenants.get(authorization)
        if hit is not None and hit[1] > now:
            return hit[0]
        tenant = authenticate(session, authorization)
        with self._lock:
            if len(self._tenants) > 10_000:  # bounded: drop everything rather than track recency
                self._tenants.clear()
            self._tenants[authorization] = (tenant, now + self.ttl)
        return tenant
