"""Versioned, crash-safe storage of prompt artifacts and the tenant registry, as plain files.

    <root>/global/v000001.safetensors ...   immutable versions of the global prompt
    <root>/global/CURRENT                   "N": the version in use
    <root>/tenants/<id>/tenant.json         class names, θ, sha256 of the API key
    <root>/tenants/<id>/v000001.safetensors immutable versions of the tenant's local prompt
    <root>/tenants/<id>/CURRENT

Why files and not SQLite: a prompt version already is a file, so one rename-based protocol covers
both, a store is inspectable and backed up with ordinary tools, and each tenant is independent
(no global write lock, no database to migrate). Every write goes to a temporary file in the same
folder, is fsync'd and renamed into place, then the folder is fsync'd; a per-scope `flock`
serialises version numbering so concurrent uploads each get their own version. A crash at any
point leaves the old or the new version current, never a torn file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import torch
from pydantic import BaseModel, Field, field_validator

from prompts_store.artifact import (
    MAX_ARTIFACT_BYTES, TENANT_PATTERN, ArtifactError, PromptMeta, artifact_bytes, read_artifact,
)
from promptfolio.portfolio import check_theta

VERSION_RE = re.compile(r"^v(\d{6,})\.safetensors$")
MAX_CLASSES = 1000
MAX_CLASS_NAME = 100


class StoreError(ValueError):
    """A store operation cannot be done as asked (unknown tenant, bad id, missing version...)."""


class UnknownTenant(StoreError):
    pass


def validate_tenant_id(tenant: str) -> str:
    if not isinstance(tenant, str) or not re.fullmatch(TENANT_PATTERN, tenant):
        raise StoreError(f"invalid tenant id {tenant!r}: use 1-63 characters a-z, 0-9, '-' or '_', "
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
        raise StoreError(f"class names must be non-empty printable text of at most {MAX_CLASS_NAME} characters: {bad[:3]!r}")
    if len(set(cleaned)) != len(cleaned):
        raise StoreError("class names must be unique")
    return cleaned


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


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a reader sees the old or the new content, never a mix."""
    tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(6)}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


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


@dataclass(frozen=True)
class StoredPrompt:
    ctx: torch.Tensor  # [n_ctx, width] float32
    meta: PromptMeta


class PromptStore:
    def __init__(self, root: str | os.PathLike, encoder_fingerprint: str | None = None, width: int | None = None):
        self.root = Path(root)
        self.fingerprint = encoder_fingerprint
        self.width = width
        (self.root / "global").mkdir(parents=True, exist_ok=True)
        (self.root / "tenants").mkdir(parents=True, exist_ok=True)

    # ---- layout and locking -------------------------------------------------------------
    def _scope(self, tenant: str | None) -> Path:
        if tenant is None:
            return self.root / "global"
        return self.root / "tenants" / validate_tenant_id(tenant)

    def _require_tenant(self, tenant: str) -> Path:
        scope = self._scope(tenant)
        if not (scope / "tenant.json").is_file():
            raise UnknownTenant(f"unknown tenant {tenant!r}")
        return scope

    @contextlib.contextmanager
    def _locked(self, scope: Path) -> Iterator[None]:
        scope.mkdir(parents=True, exist_ok=True)
        with open(scope / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def recover(self) -> int:
        """Remove temporary files a crash left behind; returns how many. Call while no writer runs."""
        removed = 0
        for tmp in self.root.glob("**/.tmp-*"):
            tmp.unlink(missing_ok=True)
            removed += 1
        return removed

    # ---- prompt versions ----------------------------------------------------------------
    def versions(self, tenant: str | None = None) -> list[int]:
        scope = self._scope(tenant)
        if not scope.is_dir():
            return []
        return sorted(int(m.group(1)) for p in scope.iterdir() if (m := VERSION_RE.match(p.name)))

    def current_version(self, tenant: str | None = None) -> int | None:
        pointer = self._scope(tenant) / "CURRENT"
        try:
            text = pointer.read_text().strip()
        except FileNotFoundError:
            return None
        if not text.isdigit():
            raise StoreError(f"corrupt pointer {pointer}: {text[:20]!r}")
        return int(text)

    def _version_path(self, scope: Path, version: int) -> Path:
        return scope / f"v{version:06d}.safetensors"

    def put(self, ctx: torch.Tensor, meta: PromptMeta, tenant: str | None = None) -> PromptMeta:
        """Store a new immutable version and make it current. Returns the metadata as stored."""
        scope = self._scope(tenant) if tenant is None else self._require_tenant(tenant)
        kind = "global" if tenant is None else "local"
        if meta.kind != kind:
            raise ArtifactError(f"a {meta.kind} prompt cannot be stored as the {kind} prompt")
        if self.fingerprint is not None and meta.encoder != self.fingerprint:
            raise ArtifactError(f"artifact was made for encoder {meta.encoder[:60]}…, "
                                f"not the running {self.fingerprint[:60]}…")
        if self.width is not None and ctx.shape[-1] != self.width:
            raise ArtifactError(f"ctx width {ctx.shape[-1]} does not match the encoder's text width {self.width}")
        with self._locked(scope):
            version = max(self.versions(tenant), default=0) + 1
            stored = meta.model_copy(update={"version": version, "tenant": tenant})
            data = artifact_bytes(ctx, stored)
            atomic_write(self._version_path(scope, version), data)
            atomic_write(scope / "CURRENT", f"{version}\n".encode())
        return read_artifact(data)[1]

    def put_bytes(self, data: bytes, tenant: str | None = None, producer: str = "upload",
                  max_bytes: int = MAX_ARTIFACT_BYTES) -> PromptMeta:
        """Validate an uploaded artifact fully, then store it as a new version."""
        ctx, meta = read_artifact(data, self.fingerprint, self.width, max_bytes=max_bytes)
        return self.put(ctx, meta.model_copy(update={"producer": producer}), tenant)

    def load(self, tenant: str | None = None, version: int | None = None) -> StoredPrompt | None:
        """The current (or a given) version, validated against the running encoder; None if none."""
        scope = self._scope(tenant)
        if version is None:
            version = self.current_version(tenant)
            if version is None:
                return None
        path = self._version_path(scope, version)
        if not path.is_file():
            raise StoreError(f"version {version} of {'the global prompt' if tenant is None else tenant!r} does not exist")
        ctx, meta = read_artifact(path.read_bytes(), self.fingerprint, self.width)
        return StoredPrompt(ctx, meta)

    def rollback(self, tenant: str | None = None, version: int | None = None) -> int:
        """Point CURRENT at `version` (default: the newest one older than current)."""
        scope = self._scope(tenant) if tenant is None else self._require_tenant(tenant)
        with self._locked(scope):
            existing = self.versions(tenant)
            current = self.current_version(tenant)
            if version is None:
                older = [v for v in existing if current is not None and v < current]
                if not older:
                    raise StoreError("no earlier version to roll back to")
                version = older[-1]
            if version not in existing:
                raise StoreError(f"version {version} does not exist (have {existing[-10:]})")
            atomic_write(scope / "CURRENT", f"{version}\n".encode())
        return version

    def prune(self, tenant: str | None = None, keep: int = 5) -> list[int]:
        """Delete all but the newest `keep` versions; the current one is always kept."""
        scope = self._scope(tenant)
        with self._locked(scope):
            existing = self.versions(tenant)
            current = self.current_version(tenant)
            doomed = [v for v in existing[: max(0, len(existing) - keep)] if v != current]
            for v in doomed:
                self._version_path(scope, v).unlink()
            fsync_dir(scope)
        return doomed

    # ---- tenant registry ----------------------------------------------------------------
    def add_tenant(self, tenant: str, classes: list[str], theta: float | None = None) -> str:
        """Register a tenant; returns its API key (shown once, stored only as a hash)."""
        scope = self._scope(tenant)
        classes = validate_classes(classes)
        key = new_key(tenant)
        with self._locked(scope):
            if (scope / "tenant.json").exists():
                raise StoreError(f"tenant {tenant!r} already exists")
            record = TenantRecord(id=tenant, classes=classes, theta=theta, key_sha256=hash_key(key),
                                  created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            atomic_write(scope / "tenant.json", record.model_dump_json(indent=2).encode())
        return key

    def tenant(self, tenant: str) -> TenantRecord:
        scope = self._require_tenant(tenant)
        return TenantRecord.model_validate_json((scope / "tenant.json").read_bytes())

    def update_tenant(self, tenant: str, classes: list[str] | None = None, theta: float | None = None,
                      clear_theta: bool = False) -> TenantRecord:
        scope = self._require_tenant(tenant)
        with self._locked(scope):
            record = self.tenant(tenant)
            update: dict[str, object] = {}
            if classes is not None:
                update["classes"] = validate_classes(classes)
            if theta is not None:
                update["theta"] = check_theta(theta)
            if clear_theta:
                update["theta"] = None
            record = record.model_copy(update=update)
            atomic_write(scope / "tenant.json", record.model_dump_json(indent=2).encode())
        return record

    def rotate_key(self, tenant: str) -> str:
        scope = self._require_tenant(tenant)
        key = new_key(tenant)
        with self._locked(scope):
            record = self.tenant(tenant).model_copy(update={"key_sha256": hash_key(key)})
            atomic_write(scope / "tenant.json", record.model_dump_json(indent=2).encode())
        return key

    def tenants(self) -> list[str]:
        base = self.root / "tenants"
        return sorted(p.name for p in base.iterdir() if (p / "tenant.json").is_file())

    def verify_key(self, tenant: str, key: str) -> bool:
        try:
            record = self.tenant(tenant)
        except (UnknownTenant, StoreError):
            return False
        return hmac.compare_digest(record.key_sha256, hash_key(key))
