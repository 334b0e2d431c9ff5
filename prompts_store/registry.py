"""The tenant registry record and the checks on what a tenant may be called and classify into."""

from __future__ import annotations

import re

from pydantic import BaseModel, Field, field_validator

from prompts_store.artifact import TENANT_PATTERN
from prompts_store.errors import StoreError
from promptfolio.portfolio import check_theta

MAX_CLASSES = 1000
MAX_CLASS_NAME = 100


def validate_tenant_id(tenant: str) -> str:
    if not isinstance(tenant, str) or not re.fullmatch(TENANT_PATTERN, tenant):
        raise StoreError(f"invalid tenant id {str(tenant)[:80]!r}: use 1-63 characters a-z, 0-9, '-' or '_', "
                         f"starting with a letter or digit")
    return tenant


def validate_classes(classes: list[str]) -> list[str]:
    if not classes:
        raise StoreError("a tenant needs at least one class name")
    if len(classes) > MAX_CLASSES:
        raise StoreError(f"at most {MAX_CLASSES} classes, got {len(classes)}")
    cleaned = [c.strip() if isinstance(c, str) else c for c in classes]
    bad = [c for c in cleaned if not isinstance(c, str) or not c or len(c) > MAX_CLASS_NAME or not c.isprintable()]
    if bad:
        shown = [b[:40] + "…" if isinstance(b, str) and len(b) > 40 else b for b in bad[:3]]
        raise StoreError(f"class names must be non-empty printable text of at most {MAX_CLASS_NAME} characters: "
                         f"{shown!r}")
    if len(set(cleaned)) != len(cleaned):
        raise StoreError("class names must be unique")
    return cleaned


class TenantRecord(BaseModel):
    id: str = Field(pattern=TENANT_PATTERN)
    classes: list[str]
    theta: float | None = None  # None: use the θ of the current local artifact, else the default
    key_sha256: str
    created_at: str = ""

    @field_validator("theta")
    @classmethod
    def _theta(cls, v: float | None) -> float | None:
        return None if v is None else check_theta(v)
