"""File primitives of the store (also used by training for its outputs): atomic replace and locks.

Why hand-written: the protocol is four system calls (write a temporary file in the same folder,
fsync it, rename it over the target, fsync the folder) and a `flock`; no library does exactly
this without pulling in more than it saves.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _durable_temporary(path: Path, data: bytes, tmp_dir: Path | None) -> Path:
    """`data` in a new temporary file beside `path` (or in `tmp_dir`), flushed to disk; removed on failure."""
    tmp = (path.parent if tmp_dir is None else Path(tmp_dir)) / f"{TMP_PREFIX}{path.name}-{secrets.token_hex(6)}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Write `data` to `path` so a reader sees the old or the new content, never a mix.

    The temporary file goes beside `path`, or into `tmp_dir` (on the same file system: the rename
    stays atomic), which lets a store clear a crash's leftovers from one folder instead of walking
    every tenant's."""
    path = Path(path)
    tmp = _durable_temporary(path, data, tmp_dir)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def create_exclusive(path: Path, data: bytes, tmp_dir: Path | None = None) -> bool:
    """Like `atomic_write`, but only if `path` does not exist yet (a hard link, which refuses an existing
    name, puts it in place): False, and nothing changed, when it does."""
    path = Path(path)
    tmp = _durable_temporary(path, data, tmp_dir)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive `flock` on `<folder>/.lock`: serialises writers across threads and processes."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def remove_temporaries(root: Path) -> int:
    """Delete the temporary files a crash left behind under `root`; returns how many."""
    removed = 0
    for tmp in root.glob(f"**/{TMP_PREFIX}*"):
        if tmp.is_dir():  # a deleted tenant's folder whose removal a crash interrupted
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed += 1
    return removed
