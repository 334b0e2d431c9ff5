"""Versioned, crash-safe storage of prompt artifacts and the tenant registry, as plain files.

    <root>/global/v000001.safetensors ...   immutable versions of the global prompt
    <root>/global/CURRENT                   {"version": N, "sha256": ...}: the global in use
    <root>/tenants/_abc/<id>/tenant.json     class names, θ, sha256 of the API key
    <root>/tenants/_abc/<id>/v000001.safetensors  immutable versions of the tenant's local prompt
    <root>/tenants/_abc/<id>/CURRENT         the served pair: local version + pinned global version
    <root>/tenants/index.sqlite             every tenant id in order, and the class lists in use
    <root>/<scope>/features/                class features persisted by the service, by content
    <root>/tmp/                             writes in progress (a crash's leftovers are cleared at start)

Tenant folders are fanned out by a hash of the id (`_abc`, see prompts_store/tenant_index.py) so
that no folder holds more than a few hundred entries at a million tenants, and listed a page at a time
from the index. A store of the old flat layout (`tenants/<id>/`) is migrated when it is opened.

Why files and not SQLite: a prompt version already is a file, so one rename-based protocol covers
both, a store is inspectable and backed up with ordinary tools, and each tenant is independent
(no global write lock, no database to migrate). Every write goes to a temporary file in the same
folder, is fsync'd and renamed into place, then the folder is fsync'd; a per-scope `flock`
serialises version numbering so concurrent uploads each get their own version. A crash at any
point leaves the old or the new version current, never a torn file.

Pinning: a local prompt is trained together with one global prompt and is served with it. A
local artifact records that global's content hash; the store resolves it to one of its global
versions when the local prompt is stored and pins the tenant to it. Pruning never removes a
pinned global. Artifacts without a recorded global are "unpinned": served with the current one.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from prompts_store.artifact import (
    MAX_ARTIFACT_BYTES, ArtifactError, PromptMeta, artifact_bytes, content_sha256, read_artifact,
)
from prompts_store.errors import (  # noqa: F401 - re-exported
    NoStore, NothingToRollBack, StoreError, UnknownGlobal, UnknownTenant, UnknownVersion,
)
from prompts_store.files import atomic_write, fsync_dir, locked, remove_temporaries  # noqa: F401
from prompts_store.keys import hash_key, key_tenant  # noqa: F401 - re-exported
from prompts_store.layout import open_root
from prompts_store.pointers import GlobalPointer, Serving, TenantPointer
from prompts_store.registry import TenantRecord, TenantRegistry, validate_tenant_id
from prompts_store.tenant_index import INDEX_FILE, TenantIndex, migrate_flat_layout, rebuild_index, shard

__all__ = ["PromptStore", "StoredPrompt", "StoreError", "UnknownTenant", "UnknownGlobal", "NoStore",
           "atomic_write", "fsync_dir", "hash_key", "key_tenant", "TenantRecord", "Serving", "TenantPointer"]

META_CACHE_SIZE = 4096  # parsed version metadata kept (a few KiB each)
VERSION_RE = re.compile(r"^v(\d{6,})\.safetensors$")


@dataclass(frozen=True)
class StoredPrompt:
    ctx: torch.Tensor  # [n_ctx, width] float32
    meta: PromptMeta


class PromptStore(TenantRegistry):
    """Open a store at `root`. A missing store is an error unless `create=True`."""

    def __init__(self, root: str | os.PathLike, encoder_fingerprint: str | None = None, width: int | None = None,
                 create: bool = False, builtin_global_sha256: str | None = None):
        self.root = open_root(root, create)
        self.fingerprint = encoder_fingerprint
        self.width = width
        self.builtin_global_sha256 = builtin_global_sha256  # version 0: the service's zero-shot prompt
        self._metas: OrderedDict[tuple, PromptMeta] = OrderedDict()  # see meta()
        self._meta_lock = threading.Lock()
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(exist_ok=True)
        tenants_dir = self.root / "tenants"
        lost_index = not (tenants_dir / INDEX_FILE).exists()
        self.index = TenantIndex(tenants_dir)
        if lost_index:  # a fanned-out store whose index file went missing: find the folders once
            rebuild_index(tenants_dir, self.index)
        self.migrated = migrate_flat_layout(tenants_dir, self.index)  # 0 unless the store predates fan-out

    # ---- layout --------------------------------------------------------------------------
    def _scope(self, tenant: str | None) -> Path:
        if tenant is None:
            return self.root / "global"
        return self.root / "tenants" / shard(validate_tenant_id(tenant)) / tenant

    def tenant_dir(self, tenant: str) -> Path:
        """The folder holding `tenant`'s record, versions, pointer and features."""
        return self._scope(tenant)

    def _version_path(self, scope: Path, version: int) -> Path:
        return scope / f"v{version:06d}.safetensors"

    def feature_path(self, tenant: str | None, sha256: str, classes_digest: str, encoder_tag: str) -> Path:
        """Where the service persists the class features of one prompt content for one class list."""
        return self._scope(tenant) / "features" / f"{sha256[:32]}-{classes_digest}-{encoder_tag}.safetensors"

    def recover(self, everywhere: bool = False) -> int:
        """Remove temporary files a crash left behind; returns how many. Call while no writer runs.

        Writes stage their temporaries in `<root>/tmp/`, so clearing that folder (and the global
        scope, for leftovers of older versions) is enough and costs nothing at any tenant count;
        `everywhere` walks every tenant folder as well."""
        if everywhere:
            return remove_temporaries(self.root)
        return sum(remove_temporaries(folder) for folder in (self.tmp_dir, self.root / "global"))

    # ---- prompt versions ----------------------------------------------------------------
    def versions(self, tenant: str | None = None) -> list[int]:
        scope = self._scope(tenant)
        if not scope.is_dir():
            return []
        return sorted(int(m.group(1)) for p in scope.iterdir() if (m := VERSION_RE.match(p.name)))

    def meta(self, tenant: str | None, version: int) -> PromptMeta:
        """A version's metadata, validated once: versions are immutable, so the parsed metadata is kept
        per file identity (inode, size, mtime), which a re-created tenant's new files never share."""
        path = self._version_path(self._scope(tenant), version)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise StoreError(f"version {version} of {'the global prompt' if tenant is None else tenant!r} "
                             f"does not exist") from None
        key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
        with self._meta_lock:
            cached = self._metas.get(key)
        if cached is None:
            cached = self.load(tenant, version).meta
            with self._meta_lock:
                self._metas[key] = cached
                while len(self._metas) > META_CACHE_SIZE:
                    self._metas.popitem(last=False)
        return cached

    def load(self, tenant: str | None = None, version: int | None = None) -> StoredPrompt | None:
        """The current (or a given) version, validated against the running encoder; None if none."""
        scope = self._scope(tenant)
        if version is None:
            version = self.current_version(tenant)
            if version is None:
                return None
        path = self._version_path(scope, version)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise UnknownVersion(f"version {version} of {'the global prompt' if tenant is None else tenant!r} "
                             f"does not exist") from None
        ctx, meta = read_artifact(data, self.fingerprint, self.width)
        return StoredPrompt(ctx, meta)

    def _read_pointer(self, scope: Path) -> str | None:
        try:
            return (scope / "CURRENT").read_text().strip()
        except FileNotFoundError:
            return None

    def global_pointer(self) -> GlobalPointer | None:
        text = self._read_pointer(self.root / "global")
        if text is None:
            return None
        if text.isdigit():  # a store from before pinning: the bare version number
            return GlobalPointer(version=int(text), sha256=self.meta(None, int(text)).content_sha256)
        try:
            return GlobalPointer.model_validate_json(text)
        except ValidationError:
            raise StoreError(f"corrupt pointer {self.root / 'global' / 'CURRENT'}: {text[:40]!r}") from None

    def tenant_pointer(self, tenant: str) -> TenantPointer:
        scope = self._require_tenant(tenant)
        text = self._read_pointer(scope)
        if text is None:
            return TenantPointer()
        if text.isdigit():  # a store from before pinning
            return self._pointer_for(tenant, int(text))
        try:
            return TenantPointer.model_validate_json(text)
        except ValidationError:
            raise StoreError(f"corrupt pointer {scope / 'CURRENT'}: {text[:40]!r}") from None

    def current_version(self, tenant: str | None = None) -> int | None:
        if tenant is None:
            pointer = self.global_pointer()
            return None if pointer is None else pointer.version
        return self.tenant_pointer(tenant).local

    def find_global(self, sha256: str, hint: int | None = None) -> int | None:
        """The store version of the global prompt with this content hash (0: the built-in one)."""
        if sha256 == self.builtin_global_sha256:
            return 0
        candidates = self.versions(None)
        if hint in candidates:  # the version the artifact names, when it still holds that content
            candidates = [hint] + [v for v in reversed(candidates) if v != hint]
        else:
            candidates = list(reversed(candidates))
        for version in candidates:
            try:
                if self.meta(None, version).content_sha256 == sha256:
                    return version
            except (ArtifactError, StoreError):
                continue
        return None

    def global_sha(self, version: int) -> str | None:
        return self.builtin_global_sha256 if version == 0 else self.meta(None, version).content_sha256

    def resolve_pin(self, meta: PromptMeta, allow_unpinned: bool = False) -> int | None:
        """The global version a local prompt is served with; None = unpinned (follows the current)."""
        if meta.global_sha256 is None:
            return None  # an artifact from before pinning
        version = self.find_global(meta.global_sha256, meta.global_version)
        if version is None and not allow_unpinned:
            raise UnknownGlobal(
                f"this local prompt was trained with global prompt sha256 {meta.global_sha256[:16]}… "
                f"(version {meta.global_version if meta.global_version is not None else 'unknown'}), which this "
                f"store does not hold: publish that global prompt first, or upload with allow_unpinned=true to "
                f"serve it with the current global prompt (unpinned)")
        return version

    def _pointer_for(self, tenant: str, version: int) -> TenantPointer:
        """The pointer serving local `version` with the global it was trained with (unpinned if the
        artifact records none, or one the store no longer holds)."""
        meta = self.meta(tenant, version)
        trained_with = None
        if meta.global_sha256 is not None:
            trained_with = self.find_global(meta.global_sha256, meta.global_version)
        return TenantPointer(local=version, local_sha256=meta.content_sha256, local_theta=meta.theta,
                             trained_with_sha256=meta.global_sha256, trained_with_version=trained_with,
                             global_version=trained_with,
                             global_sha256=None if trained_with is None else self.global_sha(trained_with))

    def put(self, ctx: torch.Tensor, meta: PromptMeta, tenant: str | None = None,
            pin: int | None | str = "resolve") -> PromptMeta:
        """Store a new immutable version and make it current. Returns the metadata as stored.

        pin (local prompts): the global version to serve it with; None: unpinned; "resolve": look
        up the global the artifact records (UnknownGlobal when the store does not hold it).
        """
        scope = self._scope(tenant) if tenant is None else self._require_tenant(tenant)
        self._check_fits(ctx, meta, "global" if tenant is None else "local")
        if pin == "resolve":
            pin = None if tenant is None else self.resolve_pin(meta)
        global_sha = None if pin is None else self.global_sha(int(pin))
        sha = content_sha256(ctx)
        with locked(scope):
            version = max(self.versions(tenant), default=0) + 1
            update: dict[str, object] = {"version": version, "tenant": tenant, "content_sha256": sha,
                                         "n_ctx": ctx.shape[0], "width": ctx.shape[1]}
            if pin is not None:
                update["global_version"] = pin  # the store version of the global it was trained with
            stored = meta.model_copy(update=update)
            self._write(self._version_path(scope, version), artifact_bytes(ctx, stored))
            if tenant is None:
                pointer: GlobalPointer | TenantPointer = GlobalPointer(version=version, sha256=sha)
            else:
                pointer = TenantPointer(local=version, local_sha256=sha, local_theta=meta.theta,
                                        trained_with_sha256=meta.global_sha256, global_version=pin,
                                        trained_with_version=pin, global_sha256=global_sha)
            self._write(scope / "CURRENT", pointer.model_dump_json().encode())
        return stored

    def _check_fits(self, ctx: torch.Tensor, meta: PromptMeta, kind: str) -> None:
        if meta.kind != kind:
            raise ArtifactError(f"a {meta.kind} prompt cannot be stored as the {kind} prompt")
        if self.fingerprint is not None and meta.encoder != self.fingerprint:
            raise ArtifactError(f"artifact was made for encoder {meta.encoder[:60]}…, "
                                f"not the running {self.fingerprint[:60]}…")
        if self.width is not None and ctx.shape[-1] != self.width:
            raise ArtifactError(f"ctx width {ctx.shape[-1]} does not match the encoder's text width {self.width}")

    def put_bytes(self, data: bytes, tenant: str | None = None, producer: str = "upload",
                  max_bytes: int = MAX_ARTIFACT_BYTES, allow_unpinned: bool = False) -> PromptMeta:
        """Validate an uploaded artifact fully, then store it as a new version."""
        ctx, meta = read_artifact(data, self.fingerprint, self.width, max_bytes=max_bytes)
        pin = None if tenant is None else self.resolve_pin(meta, allow_unpinned)
        return self.put(ctx, meta.model_copy(update={"producer": producer}), tenant, pin)

    def set_global(self, version: int) -> GlobalPointer:
        """Make an existing global version current (a rollback is a pointer move)."""
        scope = self._scope(None)
        with locked(scope):
            if version not in self.versions(None):
                raise UnknownVersion(f"global version {version} does not exist (have {self.versions(None)[-10:]})")
            pointer = GlobalPointer(version=version, sha256=self.meta(None, version).content_sha256)
            self._write(scope / "CURRENT", pointer.model_dump_json().encode())
        return pointer

    def set_pointer(self, tenant: str, pointer: TenantPointer) -> TenantPointer:
        scope = self._require_tenant(tenant)
        with locked(scope):
            if pointer.local is not None and pointer.local not in self.versions(tenant):
                raise UnknownVersion(f"version {pointer.local} of {tenant!r} does not exist")
            self._write(scope / "CURRENT", pointer.model_dump_json().encode())
        return pointer

    def rollback_target(self, tenant: str | None, version: int | None) -> int:
        """The version a rollback goes to (default: the newest one older than the current)."""
        if tenant is not None:
            self._require_tenant(tenant)
        existing = self.versions(tenant)
        current = self.current_version(tenant)
        if version is None:
            older = [v for v in existing if current is not None and v < current]
            if not older:
                raise NothingToRollBack("no earlier version to roll back to")
            return older[-1]
        if version not in existing:
            raise UnknownVersion(f"version {version} does not exist (have {existing[-10:]})")
        return version

    def rollback_pointer(self, tenant: str, version: int) -> TenantPointer:
        """What a tenant serves after rolling back to local `version`: it with its own trained global."""
        return self._pointer_for(tenant, version)

    def repin_pointer(self, tenant: str, global_version: int | None) -> TenantPointer:
        """The tenant's current local prompt served with `global_version` (None: follow the current)."""
        current = self.tenant_pointer(tenant)
        if global_version is not None and global_version != 0 and global_version not in self.versions(None):
            published = self.versions(None)[-10:] or "none"
            raise UnknownVersion(f"global version {global_version} does not exist (published: {published}; "
                                 f"0 is the built-in hand prompt)")
        sha = None if global_version is None else self.global_sha(global_version)
        return current.model_copy(update={"global_version": global_version, "global_sha256": sha,
                                          "repinned": global_version is None or sha != current.trained_with_sha256})

    def rollback(self, tenant: str | None = None, version: int | None = None) -> int:
        """Point CURRENT at `version` (no feature check: the service goes through its own writes)."""
        target = self.rollback_target(tenant, version)
        if tenant is None:
            self.set_global(target)
        else:
            self.set_pointer(tenant, self.rollback_pointer(tenant, target))
        return target

    def pinned_globals(self) -> set[int]:
        pinned = set()
        for tenant in self.tenants():
            try:
                pointer = self.tenant_pointer(tenant)
            except (StoreError, ArtifactError):
                continue
            if pointer.global_version is not None:
                pinned.add(pointer.global_version)
        return pinned

    def prune(self, tenant: str | None = None, keep: int = 5) -> list[int]:
        """Delete all but the newest `keep` versions, and their persisted features; the current
        version and, for the global prompt, every version a tenant is pinned to are always kept."""
        scope = self._scope(tenant) if tenant is None else self._require_tenant(tenant)
        protected = self.pinned_globals() if tenant is None else set()
        with locked(scope):
            existing = self.versions(tenant)
            protected.add(self.current_version(tenant))
            doomed = [v for v in existing[: max(0, len(existing) - keep)] if v not in protected]
            shas = {v: _file_sha(self._version_path(scope, v)) for v in existing}
            for v in doomed:
                self._version_path(scope, v).unlink()
            kept_shas = {s for v, s in shas.items() if v not in doomed}
            for sha in {shas[v] for v in doomed} - kept_shas - {None}:
                for path in (scope / "features").glob(f"{sha[:32]}-*"):
                    path.unlink(missing_ok=True)
            fsync_dir(scope)
        return doomed

    # ---- what a tenant serves -------------------------------------------------------------
    def serving(self, tenant: str, record: TenantRecord | None = None, pointer: TenantPointer | None = None) -> Serving:
        """What `tenant` serves now, or would serve with another record or pointer (a preview)."""
        record = record or self.tenant(tenant)
        pointer = pointer or self.tenant_pointer(tenant)
        if pointer.global_version is not None:
            g_version, g_sha = pointer.global_version, pointer.global_sha256
        else:
            current = self.global_pointer()
            g_version, g_sha = (0, self.builtin_global_sha256) if current is None else (current.version, current.sha256)
        trained = None if pointer.local is None else (pointer.trained_with_sha256 is not None
                                                      and pointer.trained_with_sha256 == g_sha)
        return Serving(tenant=tenant, classes=record.classes, theta_setting=record.theta, local_version=pointer.local,
                       local_sha256=pointer.local_sha256, local_theta=pointer.local_theta, global_version=g_version,
                       global_sha256=g_sha, pinned=pointer.pinned, trained_together=trained,
                       trained_with_sha256=pointer.trained_with_sha256,
                       trained_with_version=pointer.trained_with_version)


def _file_sha(path: Path) -> str | None:
    """The content hash an artifact's header records, without loading its tensor."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(min(n, 1 << 16)))
        return str(header["__metadata__"]["content_sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
