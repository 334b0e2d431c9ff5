"""Every write that changes what a tenant serves, validated before it commits.

Each write builds the state it would leave (a preview of the store's "serving" answer), computes
and persists the class features that state needs, and only then moves the store's pointer. If
anything fails, the write raises a 4xx error naming the problem and nothing was changed: the old
state keeps serving. The engine's write lock makes each check-then-commit atomic inside the
service (the service runs one worker; the store's file locks order writers across processes).

A global publish or rollback computes the new global's features for every class list in use (the
store keeps the list of them) and is refused, naming the tenants, if a tenant that follows the
current global could not be served with it (tenants pinned to the global their local prompt was
trained with are not affected). Its cost grows with the distinct class lists, not the tenants.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prompts_store.artifact import ArtifactError, PromptMeta, read_artifact
from prompts_store.errors import Unservable
from prompts_store.pointers import TenantPointer
from prompts_store.tenant_index import classes_digest
from service.engine import Engine, TenantView

MAX_NAMED = 5  # tenants named in a refused global publish


@dataclass
class WriteResult:
    meta: PromptMeta | None = None
    view: TenantView | None = None
    notes: list[str] = field(default_factory=list)


def check_room(engine: Engine, n_ctx: int) -> None:
    """A context must leave room for at least one class-name token: [SOS] ctx <name> . [EOS]."""
    limit = engine.encoder.context_length - 5
    if n_ctx > limit:
        raise ArtifactError(f"a context of {n_ctx} tokens leaves no room for class names in the encoder's "
                         f"context length {engine.encoder.context_length} (at most {limit} context tokens)")


def _class_list_note(trained: list[str], served: list[str]) -> str:
    """How the artifact's class list differs from the tenant's, said precisely."""
    if sorted(trained) == sorted(served):
        what = f"trained on the tenant's {len(served)} classes in another order"
    else:
        extra, missing = set(trained) - set(served), set(served) - set(trained)
        what = (f"trained on {len(trained)} classes ({len(extra)} not among the tenant's {len(served)}, "
                f"{len(missing)} of the tenant's not among them)")
    return (f"{what}: a context is class-agnostic, so it is served with the tenant's classes (the artifact's "
            f"list is kept in its metadata)")


def register(engine: Engine, tenant: str, classes: list[str], theta: float | None) -> tuple[str, TenantView]:
    with engine.write_lock:
        record, key = engine.store.new_record(tenant, classes, theta)
        engine.store.tenant_exists_check(tenant)
        view = engine.view(tenant, serving=engine.store.serving(tenant, record=record, pointer=TenantPointer()))
        engine.store.add_tenant(tenant, classes, theta, record=(record, key))
    return key, view


def delete_tenant(engine: Engine, tenant: str) -> None:
    """The tenant's folder goes in one rename (see PromptStore.delete_tenant), then its cached features."""
    with engine.write_lock:
        engine.store.delete_tenant(tenant)
        engine.cache.drop_scope(tenant)


def rotate_key(engine: Engine, tenant: str) -> str:
    with engine.write_lock:  # not interleaved with a record rewrite (PATCH) that would restore the old key
        return engine.store.rotate_key(tenant)


def update_tenant(engine: Engine, tenant: str, classes: list[str] | None, theta: float | None,
                  clear_theta: bool) -> TenantView:
    with engine.write_lock:
        record = engine.store.updated_record(tenant, classes, theta, clear_theta)
        engine.view(tenant, serving=engine.store.serving(tenant, record=record))
        engine.store.write_record(record)
        return engine.view(tenant)


def upload_local(engine: Engine, tenant: str, data: bytes, allow_unpinned: bool = False) -> WriteResult:
    ctx, meta = read_artifact(data, engine.encoder.fingerprint, engine.encoder.text_width,
                              max_bytes=engine.cfg.max_upload_bytes)
    result = WriteResult()
    with engine.write_lock:
        record = engine.store.tenant(tenant)
        if meta.kind != "local":
            raise ArtifactError("a global prompt cannot be uploaded as a tenant's local prompt (publish it with the "
                             "admin key at /v1/global/prompt)")
        check_room(engine, meta.n_ctx)
        pin = engine.store.resolve_pin(meta, allow_unpinned)
        if meta.global_sha256 is None:
            result.notes.append("the artifact records no global prompt: it is served unpinned, with whatever "
                                "global prompt is current")
        elif pin is None:
            result.notes.append(f"the global prompt it was trained with (sha256 {meta.global_sha256[:16]}…) is not "
                                f"in this store: accepted unpinned (allow_unpinned), served with the current global")
        producer = "upload"
        if meta.tenant != tenant:
            producer = f"upload (artifact named tenant {meta.tenant!r})"
            result.notes.append(f"the artifact names tenant {meta.tenant!r}; stored as {tenant!r}'s local prompt")
        if meta.classes and meta.classes != record.classes:
            result.notes.append(_class_list_note(meta.classes, record.classes))
        pointer = TenantPointer(local_sha256=meta.content_sha256, local_theta=meta.theta,
                                trained_with_sha256=meta.global_sha256, trained_with_version=pin, global_version=pin,
                                global_sha256=None if pin is None else engine.store.global_sha(pin))
        engine.view(tenant, serving=engine.store.serving(tenant, record=record, pointer=pointer), local_ctx=ctx)
        result.meta = engine.store.put(ctx, meta.model_copy(update={"producer": producer}), tenant, pin)
        result.view = engine.view(tenant)
    return result


def rollback_local(engine: Engine, tenant: str, version: int | None) -> TenantView:
    with engine.write_lock:
        target = engine.store.rollback_target(tenant, version)
        pointer = engine.store.rollback_pointer(tenant, target)
        engine.view(tenant, serving=engine.store.serving(tenant, pointer=pointer))
        engine.store.set_pointer(tenant, pointer)
        return engine.view(tenant)


def repin(engine: Engine, tenant: str, global_version: int | None) -> TenantView:
    with engine.write_lock:
        pointer = engine.store.repin_pointer(tenant, global_version)
        engine.view(tenant, serving=engine.store.serving(tenant, pointer=pointer))
        engine.store.set_pointer(tenant, pointer)
        return engine.view(tenant)


def _check_followers(engine: Engine, sha256: str, ctx) -> int:
    """Compute (and persist) the new global's features for every class list tenants use; returns how
    many lists. A global's features depend on its content and a class list only, so the work grows with
    the distinct class lists, not the tenants: a million tenants sharing a few lists cost a few text
    encoder passes, and each follower, cold or warm, finds its features ready (memory or disk).

    Only when a list cannot be served are the tenants read (all of them, once) to find the followers
    that use it. A tenant that cannot be served with the current global either (e.g. registered from
    the command line, which loads no encoder, with names too long) does not block the change."""
    failing: dict[str, str] = {}
    checked = 0
    for digest, classes in engine.store.index.class_lists():
        try:
            engine.features(None, sha256, classes, lambda: ctx)
            checked += 1
        except Unservable as e:
            failing[digest] = str(e)
    failures = [] if not failing else _broken_followers(engine, failing)
    if failures:
        more = f" (and {len(failures) - MAX_NAMED} more)" if len(failures) > MAX_NAMED else ""
        raise Unservable(f"this global prompt would break {len(failures)} tenant(s) that follow the current global, "
                         f"so nothing was changed: {'; '.join(failures[:MAX_NAMED])}{more}")
    return checked


def _broken_followers(engine: Engine, failing: dict[str, str]) -> list[str]:
    """'tenant: reason' for each follower whose class list is in `failing` and that serves today."""
    broken = []
    for tenant in engine.store.iter_tenants():
        serving = engine.store.serving(tenant)
        reason = failing.get(classes_digest(serving.classes))
        if serving.pinned or reason is None:
            continue
        try:
            engine.view(tenant)
        except Unservable:
            continue  # unservable already
        broken.append(f"{tenant}: {reason}")
    return broken


def publish_global(engine: Engine, data: bytes) -> WriteResult:
    ctx, meta = read_artifact(data, engine.encoder.fingerprint, engine.encoder.text_width,
                              max_bytes=engine.cfg.max_upload_bytes)
    if meta.kind != "global":
        raise ArtifactError("a local prompt cannot be published as the global prompt")
    check_room(engine, meta.n_ctx)
    with engine.write_lock:
        checked = _check_followers(engine, meta.content_sha256, ctx)
        stored = engine.store.put(ctx, meta.model_copy(update={"producer": "upload"}), None)
    return WriteResult(meta=stored, notes=[f"computed its class features for the {checked} class list(s) tenants use"])


def rollback_global(engine: Engine, version: int | None) -> int:
    with engine.write_lock:
        target = engine.store.rollback_target(None, version)
        stored = engine.store.load(None, target)
        check_room(engine, stored.meta.n_ctx)
        _check_followers(engine, stored.meta.content_sha256, stored.ctx)
        engine.store.set_global(target)
    return target
