"""Pinned global↔local pairs and validate-before-commit, on a real engine over a real store
(the embedded encoder; no HTTP here, tests/test_service.py covers the routes)."""

import pytest
import torch

from promptfolio.prompts import init_context
from prompts_store.artifact import ArtifactError, PromptMeta, artifact_bytes, content_sha256
from prompts_store.errors import NoStore, StoreError, UnknownGlobal, Unservable
from prompts_store.store import PromptStore
from service import writes
from service.config import ServiceConfig
from service.engine import Engine

SHORT = ["red circle", "blue star", "green square"]
LONG_NAME = "a," * 49 + "a"  # 99 characters, ~60 tokens: beyond the embedded encoder's 32-token context


@pytest.fixture
def engine(tmp_path, embedded_encoder):
    PromptStore(tmp_path / "store", create=True)
    eng = Engine(ServiceConfig(store=tmp_path / "store", backend="torch"), encoder=embedded_encoder)
    yield eng
    eng.batcher.close()


def ctx_of(encoder, seed, n_ctx=4, scale=1.0):
    return init_context(encoder, n_ctx=n_ctx, generator=torch.Generator().manual_seed(seed)) * scale


def global_bytes(encoder, ctx):
    return artifact_bytes(ctx, PromptMeta(kind="global", encoder=encoder.fingerprint, n_ctx=ctx.shape[0],
                                          width=ctx.shape[1]))


def local_bytes(encoder, ctx, trained_with=None, theta=0.5, tenant="client-0", classes=()):
    return artifact_bytes(ctx, PromptMeta(
        kind="local", tenant=tenant, encoder=encoder.fingerprint, n_ctx=ctx.shape[0], width=ctx.shape[1],
        theta=theta, classes=list(classes), global_sha256=None if trained_with is None else content_sha256(trained_with)))


def mixed(engine, tenant):
    view = engine.view(tenant)
    from promptfolio import portfolio

    return view.t_global if view.t_local is None else portfolio.mix(view.t_global, view.t_local, view.theta)


def test_store_opening_needs_a_store(tmp_path):
    with pytest.raises(NoStore, match="no prompts store"):
        PromptStore(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()  # merely opening creates nothing
    PromptStore(tmp_path / "new", create=True)
    assert PromptStore(tmp_path / "new").tenants() == []


def test_pinned_tenant_is_unchanged_by_global_publish_and_rollback(engine, embedded_encoder):
    enc = embedded_encoder
    g1, g2 = ctx_of(enc, 1), ctx_of(enc, 2)
    assert writes.publish_global(engine, global_bytes(enc, g1)).meta.version == 1
    writes.register(engine, "pinned", SHORT, None)
    writes.register(engine, "follower", SHORT, None)
    up = writes.upload_local(engine, "pinned", local_bytes(enc, ctx_of(enc, 10), trained_with=g1))
    assert up.meta.global_version == 1 and up.meta.global_sha256 == content_sha256(g1)
    s = engine.store.serving("pinned")
    assert (s.pinned, s.global_version, s.local_version, s.trained_together, s.local_theta, s.trained_with_version) \
        == (True, 1, 1, True, 0.5, 1)
    pinned_before, follower_before = mixed(engine, "pinned"), mixed(engine, "follower")

    assert writes.publish_global(engine, global_bytes(enc, g2)).meta.version == 2
    assert torch.equal(mixed(engine, "pinned"), pinned_before)  # byte-identical
    assert not torch.equal(mixed(engine, "follower"), follower_before)
    assert engine.store.serving("follower").global_version == 2
    assert writes.rollback_global(engine, 1) == 1
    assert torch.equal(mixed(engine, "pinned"), pinned_before)
    assert torch.equal(mixed(engine, "follower"), follower_before)
    writes.rollback_global(engine, 2)

    # pruning never removes the pinned global
    for seed in range(3, 7):
        writes.publish_global(engine, global_bytes(enc, ctx_of(enc, seed)))
    features = engine.store.root / "global" / "features"
    g2_sha = content_sha256(g2)[:32]
    assert list(features.glob(f"{g2_sha}-*"))
    assert 1 not in engine.store.prune(None, keep=1) and 1 in engine.store.versions(None)
    assert engine.store.versions(None) == [1, 6]
    assert not list(features.glob(f"{g2_sha}-*"))  # a pruned version's features go with it
    assert list(features.glob(f"{content_sha256(g1)[:32]}-*"))

    # an explicit re-pin says the pair was not trained together; pinning back restores it exactly
    view = writes.repin(engine, "pinned", 6)
    assert (view.global_version, view.serving.trained_together) == (6, False)
    assert not torch.equal(mixed(engine, "pinned"), pinned_before)
    assert writes.repin(engine, "pinned", 1).serving.trained_together is True
    assert torch.equal(mixed(engine, "pinned"), pinned_before)


def test_unknown_global_is_refused_unless_unpinned_is_allowed(engine, embedded_encoder):
    enc = embedded_encoder
    writes.register(engine, "t", SHORT, None)
    stranger = ctx_of(enc, 99)
    with pytest.raises(UnknownGlobal, match="does not hold"):
        writes.upload_local(engine, "t", local_bytes(enc, ctx_of(enc, 1), trained_with=stranger))
    assert engine.store.versions("t") == []
    result = writes.upload_local(engine, "t", local_bytes(enc, ctx_of(enc, 1), trained_with=stranger),
                                 allow_unpinned=True)
    assert not engine.store.serving("t").pinned and any("unpinned" in n for n in result.notes)
    # trained with the built-in zero-shot prompt: pinned to version 0, which a publish does not move
    result = writes.upload_local(engine, "t", local_bytes(enc, ctx_of(enc, 2), trained_with=engine.zero_shot_ctx))
    before = mixed(engine, "t")
    writes.publish_global(engine, global_bytes(enc, ctx_of(enc, 3)))
    assert engine.store.serving("t").global_version == 0 and torch.equal(mixed(engine, "t"), before)
    # an artifact from before pinning: unpinned, follows the current global, said in the notes
    result = writes.upload_local(engine, "t", local_bytes(enc, ctx_of(enc, 4)), allow_unpinned=False)
    assert engine.store.serving("t").global_version == 1 and any("no global" in n for n in result.notes)
    assert any("names tenant 'client-0'" in n for n in result.notes)


def _state(engine, tenant):
    s = engine.store.serving(tenant)
    return s, engine.store.versions(tenant), mixed(engine, tenant)


def _assert_same(engine, tenant, before):
    s, versions, feats = _state(engine, tenant)
    assert (s, versions) == before[:2] and torch.equal(feats, before[2])


@pytest.mark.parametrize("scale", [3e38, 1e20])
def test_every_write_that_cannot_be_served_changes_nothing(engine, embedded_encoder, scale):
    enc = embedded_encoder
    # registration: a class name that cannot fit the context is refused, and no tenant exists after it
    for _ in range(2):  # a retry gets the same answer, not "already exists"
        with pytest.raises(Unservable, match="too long"):
            writes.register(engine, "acme", ["red circle", LONG_NAME], None)
    assert engine.store.tenants() == []
    writes.register(engine, "acme", SHORT, None)
    writes.upload_local(engine, "acme", local_bytes(enc, ctx_of(enc, 1, n_ctx=22)))  # fits short names only
    writes.upload_local(engine, "acme", local_bytes(enc, ctx_of(enc, 2)))
    before = _state(engine, "acme")

    # upload: a context too long for the tenant's classes; values that pass the finite check but overflow
    with pytest.raises(Unservable, match="too long"):
        writes.upload_local(engine, "acme", local_bytes(enc, ctx_of(enc, 3, n_ctx=27)))
    with pytest.raises(Unservable, match="not finite"):
        writes.upload_local(engine, "acme", local_bytes(enc, torch.full((4, enc.text_width), scale)))
    _assert_same(engine, "acme", before)
    # class-list change: fits the current local (n_ctx 4), so it commits; then a rollback to the
    # n_ctx-22 version cannot serve the new names and is refused
    longer = SHORT + ["yellow triangle purple cross orange star blue"]
    writes.update_tenant(engine, "acme", longer, None, False)
    before = _state(engine, "acme")
    with pytest.raises(Unservable, match="too long"):
        writes.rollback_local(engine, "acme", 1)
    with pytest.raises(Unservable, match="too long"):
        writes.update_tenant(engine, "acme", SHORT + [LONG_NAME], 0.3, False)
    _assert_same(engine, "acme", before)

    # global publish / rollback: refused when a tenant that follows the current global breaks
    writes.publish_global(engine, global_bytes(enc, ctx_of(enc, 5)))
    before = _state(engine, "acme")
    for bad in (ctx_of(enc, 6, n_ctx=27), torch.full((4, enc.text_width), scale)):
        with pytest.raises(Unservable, match="would break 1 tenant.*acme"):
            writes.publish_global(engine, global_bytes(enc, bad))
    assert engine.store.versions(None) == [1]
    _assert_same(engine, "acme", before)

    # with acme pinned, a long global may be published (nobody follows it); re-pinning acme to it
    # and rolling the global back to a version that breaks a follower are both refused
    g1 = engine.store.load(None, 1).ctx
    writes.upload_local(engine, "acme", local_bytes(enc, ctx_of(enc, 7), trained_with=g1))
    before = _state(engine, "acme")
    long_global = writes.publish_global(engine, global_bytes(enc, ctx_of(enc, 8, n_ctx=27))).meta.version
    with pytest.raises(ArtifactError, match="no room for class names"):
        writes.publish_global(engine, global_bytes(enc, ctx_of(enc, 9, n_ctx=28)))
    with pytest.raises(Unservable, match="too long"):
        writes.repin(engine, "acme", long_global)
    _assert_same(engine, "acme", before)
    writes.rollback_global(engine, 1)
    writes.register(engine, "follower", SHORT, None)
    with pytest.raises(Unservable, match="follower"):
        writes.rollback_global(engine, long_global)
    assert engine.store.current_version(None) == 1
    # a tenant that is unservable already (the CLI registers without an encoder) does not block a publish
    engine.store.add_tenant("cli-added", ["x", LONG_NAME])
    with pytest.raises(Unservable, match="cli-added"):
        engine.view("cli-added")
    assert writes.publish_global(engine, global_bytes(enc, ctx_of(enc, 10))).meta.version == long_global + 1


def test_legacy_store_pointers_still_serve(engine, embedded_encoder):
    enc = embedded_encoder
    writes.register(engine, "old", SHORT, 0.7)
    writes.upload_local(engine, "old", local_bytes(enc, ctx_of(enc, 1)))
    expected = mixed(engine, "old")
    (engine.store.tenant_dir("old") / "CURRENT").write_text("1\n")  # a pointer written before pinning
    engine.cache = type(engine.cache)(1 << 20)
    s = engine.store.serving("old")
    assert (s.local_version, s.pinned, s.global_version) == (1, False, 0)
    assert torch.equal(mixed(engine, "old"), expected)


def test_dtypes_and_contradicting_metadata(engine, embedded_encoder):
    enc = embedded_encoder
    writes.register(engine, "t", SHORT, None)
    half = ctx_of(enc, 1).half()
    from safetensors.torch import save

    from prompts_store.artifact import read_artifact

    meta = PromptMeta(kind="local", tenant="t", encoder=enc.fingerprint, n_ctx=4, width=enc.text_width,
                      content_sha256=content_sha256(half.float()))
    result = writes.upload_local(engine, "t", save({"ctx": half}, metadata=meta.to_strings()))
    stored = engine.store.load("t", result.meta.version)
    assert stored.ctx.dtype == torch.float32 and torch.equal(stored.ctx, half.float())  # converted exactly
    with pytest.raises(ArtifactError, match="float32"):
        read_artifact(save({"ctx": half.double()}, metadata=meta.to_strings()))
    result = writes.upload_local(engine, "t", local_bytes(enc, ctx_of(enc, 2), tenant="other", classes=["x", "y"]))
    assert any("names tenant 'other'" in n for n in result.notes)
    assert any("class-agnostic" in n for n in result.notes)
    stored = engine.store.meta("t", result.meta.version)
    assert stored.tenant == "t" and "other" in stored.producer and stored.classes == ["x", "y"]
    with pytest.raises(StoreError):
        writes.repin(engine, "t", 42)


# ---- property: no artifact, however built, gives anything but a clear refusal or a servable version ----
import json  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=30)
FIELDS = ["kind", "tenant", "encoder", "n_ctx", "width", "classes", "theta", "content_sha256", "global_sha256",
          "global_version", "version", "format", "producer", "created_at", "unknown_field"]


field_values = st.one_of(st.text(max_size=40), json_values.map(json.dumps), st.just("[" * 3000 + "]" * 3000),
                         st.sampled_from(["nan", "-1", "1e999", "local", "global", "0" * 64]))


mutation = st.one_of(
    st.tuples(st.just("bytes"), st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1,
                                         max_size=6)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16)),
    st.tuples(st.just("field"), st.sampled_from(FIELDS), field_values),
    st.tuples(st.just("values"), st.sampled_from([0.0, 1e-30, 1.0, 1e4, 1e19, 1e20, 3e38, -3e38]),
              st.integers(0, 63), st.booleans()),
)


def _mutate(good: bytes, kind: str, *args) -> bytes:
    import struct

    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    if kind == "bytes":
        data = bytearray(good)
        for pos, value in args[0]:
            data[pos % len(data)] = value
        return bytes(data)
    if kind == "truncate":
        return good[: args[0] % len(good)]
    (n,) = struct.unpack("<Q", good[:8])
    strings = json.loads(good[8: 8 + n])["__metadata__"]
    ctx = st_load(good)["ctx"]
    if kind == "field":
        strings[args[0]] = args[1]
        return st_save({"ctx": ctx}, metadata=strings)
    value, row, rehash = args  # a huge value in one row, with the content hash recomputed or not
    ctx = ctx.clone()
    ctx[row % ctx.shape[0]] = value
    if rehash:
        strings["content_sha256"] = content_sha256(ctx)
    return st_save({"ctx": ctx}, metadata=strings)


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutation)
def test_mutated_artifacts_are_refused_or_served(engine, embedded_encoder, change):
    enc = embedded_encoder
    if "t" not in engine.store.tenants():
        writes.register(engine, "t", SHORT, None)
    good = local_bytes(enc, ctx_of(enc, 1), tenant="t")
    data = _mutate(good, *change)
    before = engine.store.serving("t")
    try:
        result = writes.upload_local(engine, "t", data)
    except (ArtifactError, StoreError) as e:  # the API answers these 4xx with the message
        assert str(e) and engine.store.serving("t") == before  # nothing changed
    else:
        assert engine.store.serving("t").local_version == result.meta.version
    view = engine.view("t")  # never a broken tenant
    assert torch.isfinite(view.t_global).all() and (view.t_local is None or torch.isfinite(view.t_local).all())
