"""The tenant registry record and the checks on what a tenant may be called and classify into."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, Field, field_validator

from prompts_store.artifact import TENANT_PATTERN
from prompts_store.errors import StoreError, TenantExists, UnknownTenant
from prompts_store.files import atomic_write, locked
from prompts_store.keys import hash_key, key_matches, new_key
from promptfolio.portfolio import check_theta

MAX_CLASSES = 1000
MAX_CLASS_NAME = 100
# no control characters, no (Unicode) space at either end: a rule a JSON schema (the REST API's) can state
CLASS_NAME_PATTERN = r"^[^\s\x00-\x1f\x7f-\x9f](?:[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f])?$"


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
    bad = [c for c in cleaned
           if not isinstance(c, str) or len(c) > MAX_CLASS_NAME or not re.fullmatch(CLASS_NAME_PATTERN, c)]
    if bad:
        shown = [b[:40] + "…" if isinstance(b, str) and len(b) > 40 else b for b in bad[:3]]
        raise StoreError(f"class names must be non-empty text without control characters, of at most "
                         f"{MAX_CLASS_NAME} characters: "
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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class TenantRegistry:
    """Tenant records (`tenants/<id>/tenant.json`): the store's half that knows no prompts."""

    root: Path

    def _scope(self, tenant: str | None) -> Path:
        raise NotImplementedError

    def _require_tenant(self, tenant: str) -> Path:
        scope = self._scope(tenant)
        if not (scope / "tenant.json").is_file():
            raise UnknownTenant(f"unknown tenant {tenant!r}")
        return scope

    def new_record(self, tenant: str, classes: list[str], theta: float | None = None) -> tuple[TenantRecord, str]:
        """A validated record for a new tenant and its API key (nothing written yet)."""
        validate_tenant_id(tenant)
        key = new_key(tenant)
        record = TenantRecord(id=tenant, classes=validate_classes(classes),
                              theta=None if theta is None else check_theta(theta), key_sha256=hash_key(key),
                              created_at=_now())
        return record, key

    def tenant_exists_check(self, tenant: str) -> None:
        if (self._scope(tenant) / "tenant.json").exists():
            raise TenantExists(f"tenant {tenant!r} already exists")

    def add_tenant(self, tenant: str, classes: list[str], theta: float | None = None,
                   record: tuple[TenantRecord, str] | None = None) -> str:
        """Register a tenant; returns its API key (shown once, stored only as a hash)."""
        record, key = record or self.new_record(tenant, classes, theta)
        scope = self._scope(tenant)
        with locked(scope):
            if (scope / "tenant.json").exists():
                raise TenantExists(f"tenant {tenant!r} already exists")
            atomic_write(scope / "tenant.json", record.model_dump_json(indent=2).encode())
        return key

    def tenant(self, tenant: str) -> TenantRecord:
        scope = self._require_tenant(tenant)
        return TenantRecord.model_validate_json((scope / "tenant.json").read_bytes())

    def updated_record(self, tenant: str, classes: list[str] | None = None, theta: float | None = None,
                       clear_theta: bool = False) -> TenantRecord:
        """The tenant's record with the changes applied (nothing written yet)."""
        update: dict[str, object] = {}
        if classes is not None:
            update["classes"] = validate_classes(classes)
        if theta is not None:
            update["theta"] = check_theta(theta)
        if clear_theta:
            update["theta"] = None
        return self.tenant(tenant).model_copy(update=update)

    def write_record(self, record: TenantRecord) -> TenantRecord:
        scope = self._require_tenant(record.id)
        with locked(scope):
            atomic_write(scope / "tenant.json", record.model_dump_json(indent=2).encode())
        return record

    def update_tenant(self, tenant: str, classes: list[str] | None = None, theta: float | None = None,
                      clear_theta: bool = False) -> TenantRecord:
        return self.write_record(self.updated_record(tenant, classes, theta, clear_theta))

    def rotate_key(self, tenant: str) -> str:
        scope = self._require_tenant(tenant)
        key = new_key(tenant)
        with locked(scope):
            record = self.tenant(tenant).model_copy(update={"key_sha256": hash_key(key)})
            atomic_write(scope / "tenant.json", record.model_dump_json(indent=2).encode())
        return key

    def tenants(self) -> list[str]:
        base = self.root / "tenants"
        return sorted(p.name for p in base.iterdir() if (p / "tenant.json").is_file())

    def tenant_page(self, after: str | None, limit: int) -> list[str]:
        """Up to `limit` tenant ids in ascending order, strictly after `after` (None: from the start)."""
        return [t for t in self.tenants() if after is None or t > after][:limit]

    def verify_key(self, tenant: str, key: str) -> bool:
        try:
            record = self.tenant(tenant)
        except StoreError:
            return False
        return key_matches(record.key_sha256, key)

