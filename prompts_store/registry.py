"""The tenant registry record and the checks on what a tenant may be called and classify into."""

from __future__ import annotations

import os
import re
import secrets
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel, Field, field_validator

from prompts_store.artifact import TENANT_PATTERN
from prompts_store.errors import StoreError, TenantExists, UnknownTenant
from prompts_store.files import TMP_PREFIX, atomic_write, create_exclusive, fsync_dir, locked
from prompts_store.keys import hash_key, key_matches, new_key
from prompts_store.tenant_index import TenantIndex
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
    """Tenant records (`tenants/_abc/<id>/tenant.json`): the store's half that knows no prompts."""

    root: Path
    index: TenantIndex
    tmp_dir: Path  # where writes stage their temporary files (same file system, one folder to clean)

    def _scope(self, tenant: str | None) -> Path:
        raise NotImplementedError

    def _write(self, path: Path, data: bytes) -> None:
        atomic_write(path, data, self.tmp_dir)

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
        self.tenant_exists_check(tenant)
        self.index.add([tenant], [record.classes])  # before the folder: the index never misses a tenant
        scope.mkdir(parents=True, exist_ok=True)
        if not create_exclusive(scope / "tenant.json", record.model_dump_json(indent=2).encode(), self.tmp_dir):
            raise TenantExists(f"tenant {tenant!r} already exists")  # registered meanwhile (another process)
        return key

    def add_tenants(self, tenants: list[tuple[str, list[str], float | None]]) -> dict[str, str]:
        """Register many tenants at once -> {tenant: API key}: the same files as `add_tenant`, synced
        twice per batch instead of fsync'd per file (a benchmark, an import of a million tenants).

        As crash-safe as one at a time: every record is written to a temporary file, all are synced,
        and only then does each appear under its name (a hard link, which fails if the name exists,
        so a concurrent registration of the same id is never overwritten); a crash leaves
        temporaries (cleared at start) and index ids without a folder (skipped), never a torn record.
        """
        made = [self.new_record(tenant, classes, theta) for tenant, classes, theta in tenants]
        ids = [record.id for record, _ in made]
        if len(set(ids)) != len(ids):
            raise StoreError("a tenant id appears twice in the batch")
        taken = [t for t in ids if (self._scope(t) / "tenant.json").exists()]
        if taken:
            raise StoreError(f"{len(taken)} tenant(s) already exist, e.g. {taken[:3]}: nothing was registered")
        self.index.add(ids, {tuple(r.classes): r.classes for r, _ in made}.values())
        staged = []
        for record, _ in made:
            tmp = self.tmp_dir / f"{TMP_PREFIX}tenant-{record.id}-{secrets.token_hex(4)}"
            tmp.write_bytes(record.model_dump_json(indent=2).encode())
            staged.append((tmp, self._scope(record.id)))
        os.sync()  # every record's bytes are on disk before any becomes visible under its name
        clashes = []
        for tmp, scope in staged:
            scope.mkdir(parents=True, exist_ok=True)
            try:
                os.link(tmp, scope / "tenant.json")
            except FileExistsError:
                clashes.append(scope.name)
            tmp.unlink()
        os.sync()  # the names
        if clashes:
            raise StoreError(f"{len(clashes)} tenant(s) were registered by someone else meanwhile, e.g. "
                             f"{clashes[:3]}: the others were registered")
        return {record.id: key for record, key in made}

    def delete_tenant(self, tenant: str) -> None:
        """Remove a tenant: record, key, prompt versions, pointer, features; nothing of others.

        One rename moves the folder into `tmp/` (atomic: the tenant is there or gone), then it is
        removed and its id leaves the index; a crash in between leaves only what start clears."""
        scope = self._require_tenant(tenant)
        trash = self.tmp_dir / f"{TMP_PREFIX}deleted-{tenant}-{secrets.token_hex(4)}"
        with locked(scope):
            os.rename(scope, trash)
        fsync_dir(scope.parent)
        shutil.rmtree(trash, ignore_errors=True)
        self.index.remove(tenant)

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
        self.index.add([], [record.classes])  # a global publish checks every class list in use
        with locked(scope):
            self._write(scope / "tenant.json", record.model_dump_json(indent=2).encode())
        return record

    def update_tenant(self, tenant: str, classes: list[str] | None = None, theta: float | None = None,
                      clear_theta: bool = False) -> TenantRecord:
        return self.write_record(self.updated_record(tenant, classes, theta, clear_theta))

    def rotate_key(self, tenant: str) -> str:
        scope = self._require_tenant(tenant)
        key = new_key(tenant)
        with locked(scope):
            record = self.tenant(tenant).model_copy(update={"key_sha256": hash_key(key)})
            self._write(scope / "tenant.json", record.model_dump_json(indent=2).encode())
        return key

    def tenant_page(self, after: str | None, limit: int) -> list[str]:
        """Up to `limit` tenant ids in ascending order, strictly after `after` (None: from the first).

        A range read of the index (O(log n + limit)) and one stat per id: ids whose folder is gone
        (a crashed registration or deletion) are skipped, and the page is filled from further on.
        """
        if limit < 1:
            raise StoreError(f"a page holds at least one tenant, got limit {limit}")
        page: list[str] = []
        cursor = after
        while len(page) < limit:
            ids = self.index.page(cursor, limit - len(page))
            if not ids:
                break
            page += [t for t in ids if (self._scope(t) / "tenant.json").is_file()]
            cursor = ids[-1]
        return page

    def iter_tenants(self, page_size: int = 1000) -> Iterator[str]:
        """Every tenant id in ascending order, read a page at a time (memory stays flat at any count)."""
        after = None
        while page := self.tenant_page(after, page_size):
            yield from page
            after = page[-1]

    def tenants(self) -> list[str]:
        """Every tenant id in ascending order (a list: prefer `iter_tenants` or `tenant_page` at scale)."""
        return list(self.iter_tenants())

    def verify_key(self, tenant: str, key: str) -> bool:
        try:
            record = self.tenant(tenant)
        except StoreError:
            return False
        return key_matches(record.key_sha256, key)

