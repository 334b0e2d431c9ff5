"""What can go wrong in the store, as exceptions the service maps to 4xx answers."""

from __future__ import annotations


class StoreError(ValueError):
    """A store operation cannot be done as asked (unknown tenant, bad id, missing version...)."""


class UnknownTenant(StoreError):
    pass


class TenantExists(StoreError):
    """A tenant with this id is already registered."""


class UnknownVersion(StoreError):
    """A prompt version the store does not hold."""


class NothingToRollBack(StoreError):
    """A rollback without a version, where no version older than the current exists."""


class NoStore(StoreError):
    """The path holds no prompts store (and nobody asked to create one)."""


class UnknownGlobal(StoreError):
    """A local prompt names a global prompt the store does not hold."""


class Unservable(StoreError):
    """A write validated but its tenant could not be served with it (e.g. class names too long for
    the context, features not finite): nothing was changed."""
