"""Tenant API keys: `pf.<tenant>.<secret>`, stored only as a sha256."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from prompts_store.artifact import TENANT_PATTERN


def hash_key(key: str) -> str:
    # keys are 192-bit random tokens, so a plain sha256 is enough (no password stretching needed)
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(tenant: str) -> str:
    """`pf.<tenant>.<secret>`: the tenant is readable so a wrong-tenant key gets a precise 403."""
    return f"pf.{tenant}.{secrets.token_urlsafe(24)}"


def key_tenant(key: str) -> str | None:
    parts = key.split(".")
    if len(parts) != 3 or parts[0] != "pf" or not re.fullmatch(TENANT_PATTERN, parts[1]):
        return None
    return parts[1]


def key_matches(key_sha256: str, key: str) -> bool:
    return hmac.compare_digest(key_sha256, hash_key(key))
