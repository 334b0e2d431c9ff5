"""Tenant folders fanned out by hash, and an ordered index of tenant ids: a store of a million
tenants lists a page of them, finds one, and registers many without listing a directory.

    <root>/tenants/_abc/<id>/        a tenant's folder; abc: the first 3 hex digits of sha256(id)
    <root>/tenants/index.sqlite      every tenant id, in order, and every class list tenants use

Fan-out keeps each folder small: 4,096 shards hold about 250 tenants each at a million (one level:
a second one would cost a folder, a 4 KiB block and a mkdir per tenant in small stores). A shard's name
starts with "_", which no tenant id can, so the old flat layout (`tenants/<id>/`) is told apart
entry by entry and migrated in place (`migrate_flat_layout`).

The folders are the truth; the index is a superset of them. An id is added before its folder is
created and removed only after its folder is gone, so a crash leaves at most an id without a folder
(a "ghost", which listings skip), never a tenant the index misses. Likewise a class list is
recorded before a tenant record names it, so the list of class lists covers every tenant's
(a global publish checks those, not a million tenants; see service/writes.py).

Why SQLite (stdlib): an ordered, crash-safe index with range queries is a B-tree with a journal;
writing one by hand would be most of this module and none of it would be better.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Iterable, Iterator

from prompts_store.artifact import TENANT_PATTERN
from prompts_store.files import TMP_PREFIX, locked

INDEX_FILE = "index.sqlite"
SHARD_PREFIX = "_"  # tenant ids start with [a-z0-9]: a shard folder can never be mistaken for a tenant
TENANT_RE = re.compile(TENANT_PATTERN)
SCHEMA = ("CREATE TABLE IF NOT EXISTS tenants (id TEXT PRIMARY KEY) WITHOUT ROWID",
          "CREATE TABLE IF NOT EXISTS class_lists (digest TEXT PRIMARY KEY, classes TEXT NOT NULL) WITHOUT ROWID")


def classes_digest(classes: list[str]) -> str:
    """The identity of a class list (features are keyed by it)."""
    return hashlib.sha256("\x1f".join(classes).encode()).hexdigest()[:16]


def shard(tenant: str) -> str:
    """`_abc`: the folder under `tenants/` that holds `tenant`'s folder."""
    return SHARD_PREFIX + hashlib.sha256(tenant.encode()).hexdigest()[:3]


class TenantIndex:
    """The ordered set of tenant ids (and used class lists) in `<tenants>/index.sqlite`."""

    def __init__(self, tenants_dir: Path):
        self.path = tenants_dir / INDEX_FILE
        with closing(self._connect()) as db:
            db.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer; persistent per file
            for statement in SCHEMA:
                db.execute(statement)

    def _connect(self) -> sqlite3.Connection:
        # a connection per call: the service calls from several threads and the CLI from other processes,
        # and opening one costs about 0.1 ms, nothing next to the file reads of the calls that use it
        return sqlite3.connect(self.path, timeout=60, isolation_level=None)

    def add(self, tenants: Iterable[str], class_lists: Iterable[list[str]] = ()) -> None:
        """Record ids (and class lists) in one durable transaction; already present is fine."""
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT OR IGNORE INTO tenants VALUES (?)", ((t,) for t in tenants))
            db.executemany("INSERT OR IGNORE INTO class_lists VALUES (?, ?)",
                           ((classes_digest(c), json.dumps(c)) for c in class_lists))
            db.execute("COMMIT")

    def remove(self, tenant: str) -> None:
        with closing(self._connect()) as db:
            db.execute("DELETE FROM tenants WHERE id = ?", (tenant,))

    def page(self, after: str | None, limit: int) -> list[str]:
        with closing(self._connect()) as db:
            rows = db.execute("SELECT id FROM tenants WHERE id > ? ORDER BY id LIMIT ?", (after or "", limit))
            return [r[0] for r in rows]

    def class_lists(self) -> Iterator[tuple[str, list[str]]]:
        """Every class list a tenant uses or used: (digest, classes), in digest order, a page at a time."""
        after = ""
        while True:
            with closing(self._connect()) as db:
                rows = db.execute("SELECT digest, classes FROM class_lists WHERE digest > ? ORDER BY digest "
                                  "LIMIT 1000", (after,)).fetchall()
            if not rows:
                return
            for digest, text in rows:
                yield digest, json.loads(text)
            after = rows[-1][0]

    def count_class_lists(self) -> int:
        with closing(self._connect()) as db:
            return db.execute("SELECT count(*) FROM class_lists").fetchone()[0]


def flat_tenant_folders(tenants_dir: Path) -> list[str]:
    """Tenant folders of the old flat layout still directly under `tenants/`."""
    with os.scandir(tenants_dir) as entries:
        return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False) and TENANT_RE.fullmatch(e.name))


def migrate_flat_layout(tenants_dir: Path, index: TenantIndex) -> int:
    """Move every `tenants/<id>/` folder of the old layout to `tenants/_abc/<id>/`; returns how many.

    Crash-safe and resumable: the ids (and their class lists) go into the index first, then each
    folder moves with one rename (atomic: the tenant is at its old place or its new one, never
    neither), and a later start moves what is left. A crash's temporary files inside a moved folder
    are removed on the way (new writes keep their temporaries under `<root>/tmp/`).
    """
    with locked(tenants_dir):  # two processes starting at once migrate one after the other
        old = flat_tenant_folders(tenants_dir)
        if not old:
            return 0
        index.add(old, _class_lists(tenants_dir, old))
        for tenant in old:
            source, dest = tenants_dir / tenant, tenants_dir / shard(tenant) / tenant
            for leftover in source.glob(f"{TMP_PREFIX}*"):
                leftover.unlink(missing_ok=True)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():  # only if something wrote the new place while the old one existed
                raise RuntimeError(f"tenant {tenant!r} exists in both layouts ({source} and {dest}): "
                                   f"keep one of them and start again")
            os.rename(source, dest)
        os.sync()  # the renames, durably: one sync instead of an fsync of each of thousands of folders
        return len(old)


def _class_lists(tenants_dir: Path, tenants: list[str]) -> Iterator[list[str]]:
    for tenant in tenants:
        try:
            yield json.loads((tenants_dir / tenant / "tenant.json").read_bytes())["classes"]
        except (OSError, ValueError, KeyError):
            continue  # no record (a crashed registration) or a damaged one: nothing to check it with


def rebuild_index(tenants_dir: Path, index: TenantIndex) -> int:
    """Re-create a lost index from the folders (a full walk: only when the index file is missing)."""
    found = sorted(p.parent.name for p in tenants_dir.glob(f"{SHARD_PREFIX}*/*/tenant.json"))
    for start in range(0, len(found), 10_000):
        chunk = found[start:start + 10_000]
        index.add(chunk, _class_lists_fanned(tenants_dir, chunk))
    return len(found)


def _class_lists_fanned(tenants_dir: Path, tenants: list[str]) -> Iterator[list[str]]:
    for tenant in tenants:
        try:
            yield json.loads((tenants_dir / shard(tenant) / tenant / "tenant.json").read_bytes())["classes"]
        except (OSError, ValueError, KeyError):
            continue
