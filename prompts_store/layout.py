"""Where a store keeps things; light enough for a command to check a store without loading torch."""

from __future__ import annotations

from pathlib import Path

from prompts_store.errors import NoStore

GLOBAL_DIR = "global"
TENANTS_DIR = "tenants"


def open_root(root: str | Path, create: bool = False) -> Path:
    """`root` as a store folder: created when `create`, else a NoStore error if it holds no store."""
    root = Path(root)
    if create:
        (root / GLOBAL_DIR).mkdir(parents=True, exist_ok=True)
        (root / TENANTS_DIR).mkdir(parents=True, exist_ok=True)
    elif not ((root / GLOBAL_DIR).is_dir() and (root / TENANTS_DIR).is_dir()):
        raise NoStore(f"no prompts store at {root} (create one with `promptfolio serve --init` "
                      f"or `promptfolio tenant add`)")
    return root
