"""The "current" pointers: which global version is current, and what each tenant is served.

A pointer is a small JSON file replaced atomically, so one rename moves a tenant from one served
state to the next. Stores written before pinning hold a bare version number; those are read as
the same thing (the prompt's metadata fills in the rest) and rewritten as JSON by the next write.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, Field

from prompts_store.artifact import SHA256_PATTERN


class GlobalPointer(BaseModel):
    version: int = Field(ge=1)
    sha256: str = Field(pattern=SHA256_PATTERN)


class TenantPointer(BaseModel):
    """A tenant's served pair. `global_version` None: follow the current global (unpinned)."""

    local: int | None = Field(default=None, ge=1)
    local_sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    local_theta: float | None = None  # the θ the local artifact carries (its training θ)
    trained_with_sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)  # from the artifact
    trained_with_version: int | None = Field(default=None, ge=0)  # its store version, when the store holds it
    global_version: int | None = Field(default=None, ge=0)  # 0: the built-in zero-shot prompt
    global_sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    repinned: bool = False  # an explicit re-pin chose this global, not training

    @property
    def pinned(self) -> bool:
        return self.global_version is not None


@dataclass(frozen=True)
class Serving:
    """The store's one answer to "what does this tenant serve?" (everything a classify needs)."""

    tenant: str
    classes: list[str]
    theta_setting: float | None  # the tenant's θ setting; None: the artifact's θ, else the default
    local_version: int | None
    local_sha256: str | None
    local_theta: float | None
    global_version: int  # 0: the built-in zero-shot prompt
    global_sha256: str | None  # None for version 0 when the store was not told its hash
    pinned: bool
    trained_together: bool | None  # None: no local prompt; False: re-pinned, or unpinned and since changed
    trained_with_sha256: str | None
    trained_with_version: int | None
