"""Prompt artifacts and the store, on real files."""

import json
import struct
import threading

import pytest
import torch
from safetensors.torch import save as st_save

from prompts_store.artifact import ArtifactError, PromptMeta, artifact_bytes, read_artifact
from prompts_store.store import PromptStore, StoreError, UnknownTenant, key_tenant

FP = "promptfolio-tiny:sha256:" + "ab" * 32
WIDTH = 16


def meta(kind="local", **kw):
    return PromptMeta(kind=kind, tenant="t1" if kind == "local" else None, encoder=FP, n_ctx=4, width=WIDTH, **kw)


def ctx(seed=0, n=4):
    return torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed)) * 0.02


def raw_safetensors(tensors, metadata):
    return st_save(tensors, metadata=metadata)


def test_artifact_roundtrip_is_self_describing():
    data = artifact_bytes(ctx(), meta(theta=0.3, classes=["a b", "c"], producer="run-1"))
    loaded, m = read_artifact(data, FP, WIDTH)
    assert torch.equal(loaded, ctx())
    assert (m.kind, m.tenant, m.theta, m.classes, m.producer, m.n_ctx, m.width) == \
        ("local", "t1", 0.3, ["a b", "c"], "run-1", 4, WIDTH)
    assert len(m.content_sha256) == 64


def _rewrite_header(data: bytes, old: bytes, new: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8: 8 + n].replace(old, new)
    return struct.pack("<Q", len(header)) + header + data[8 + n:]


def _with_header(header_and_body: bytes) -> bytes:
    return struct.pack("<Q", len(header_and_body)) + header_and_body


@pytest.mark.parametrize("case,message", [
    ("wrong_encoder", "made for encoder"),
    ("wrong_width", "does not match the encoder's text width"),
    ("int_dtype", "float32 tensor"),
    ("float64", "float32 tensor"),
    ("deep_header", "nested deeper"),
    ("deep_classes", "nested deeper"),
    ("nested_class_entry", "nested deeper"),
    ("non_string_meta", "invalid metadata|map names to strings"),
    ("global_names_tenant", "global prompt has no tenant"),
    ("nan", "NaN or infinite"),
    ("inf", "NaN or infinite"),
    ("extra_tensor", "exactly one tensor"),
    ("three_dims", "shape"),
    ("truncated", "truncated"),
    ("huge_header", "header of"),
    ("not_json_header", "corrupt safetensors header"),
    ("tampered", "content hash mismatch"),
    ("missing_meta", "invalid metadata"),
    ("bad_theta", "θ must be in"),
    ("oversized", "exceeds"),
    ("empty", "truncated"),
])
def test_hostile_and_malformed_artifacts_are_refused(case, message):
    good = artifact_bytes(ctx(), meta())
    strings = meta().to_strings()
    strings["content_sha256"] = read_artifact(good)[1].content_sha256
    data = {
        "wrong_encoder": artifact_bytes(ctx(), meta().model_copy(update={"encoder": "other:sha256:00"})),
        "wrong_width": artifact_bytes(torch.zeros(4, WIDTH + 1), meta()),
        "int_dtype": raw_safetensors({"ctx": torch.zeros(4, WIDTH, dtype=torch.int32)}, strings),
        "float64": raw_safetensors({"ctx": ctx().double()}, strings),
        "deep_header": _with_header(b'{"__metadata__": {}, "x": ' + b"[" * 100_00 + b"]" * 100_00 + b"}"),
        "deep_classes": raw_safetensors({"ctx": ctx()}, dict(strings, classes="[" * 5000 + "]" * 5000)),
        "nested_class_entry": raw_safetensors({"ctx": ctx()}, dict(strings, classes='[["a", ["b"]], "c"]')),
        "non_string_meta": _rewrite_header(good, b'"kind":"local"', b'"kind":{"a":[1]}'),
        "global_names_tenant": raw_safetensors({"ctx": ctx()}, dict(strings, kind="global")),
        "nan": raw_safetensors({"ctx": torch.full((4, WIDTH), float("nan"))}, strings),
        "inf": raw_safetensors({"ctx": torch.full((4, WIDTH), float("inf"))}, strings),
        "extra_tensor": raw_safetensors({"ctx": ctx(), "payload": torch.zeros(3)}, strings),
        "three_dims": raw_safetensors({"ctx": torch.zeros(1, 4, WIDTH)}, strings),
        "truncated": good[: len(good) // 2],
        "huge_header": struct.pack("<Q", 10**9) + b"{}",
        "not_json_header": struct.pack("<Q", 4) + b"\xff\xfe{x" + b"\0" * 10,
        "tampered": raw_safetensors({"ctx": ctx(seed=5)}, strings),
        "missing_meta": raw_safetensors({"ctx": ctx()}, {"kind": "local"}),
        "bad_theta": raw_safetensors({"ctx": ctx()}, dict(strings, theta="7")),
        "oversized": good + b" " * (2 << 20),
        "empty": b"",
    }[case]
    with pytest.raises(ArtifactError, match=message):
        read_artifact(data, FP, WIDTH)


def test_versions_rollback_prune_and_pointer(tmp_path):
    store = PromptStore(tmp_path, FP, WIDTH, create=True)
    store.add_tenant("t1", ["red circle", "blue star"], theta=0.4)
    assert store.current_version("t1") is None and store.load("t1") is None
    for seed in range(4):
        stored = store.put(ctx(seed), meta(), "t1")
        assert stored.version == seed + 1
    assert store.versions("t1") == [1, 2, 3, 4] and store.current_version("t1") == 4
    assert torch.equal(store.load("t1").ctx, ctx(3))
    assert store.rollback("t1") == 3 and torch.equal(store.load("t1").ctx, ctx(2))
    assert store.rollback("t1", 1) == 1
    with pytest.raises(StoreError, match="does not exist"):
        store.rollback("t1", 9)
    with pytest.raises(StoreError, match="no earlier version"):
        store.rollback("t1")
    assert store.prune("t1", keep=2) == [2]  # the current version 1 is kept
    assert store.versions("t1") == [1, 3, 4]
    # each version file is self-describing: it knows its own version and tenant
    on_disk, m = read_artifact((store.tenant_dir("t1") / "v000003.safetensors").read_bytes(), FP, WIDTH)
    assert torch.equal(on_disk, ctx(2)) and (m.version, m.tenant) == (3, "t1")
    # a global prompt cannot land in a tenant and vice versa
    with pytest.raises(ArtifactError, match="global prompt cannot be stored as the local"):
        store.put(ctx(), meta("global"), "t1")
    assert store.put(ctx(), meta("global")).version == 1


def test_tenant_registry_keys_and_validation(tmp_path):
    store = PromptStore(tmp_path, FP, WIDTH, create=True)
    key = store.add_tenant("acme", ["red circle"])
    assert key_tenant(key) == "acme" and store.verify_key("acme", key)
    assert not store.verify_key("acme", key + "x") and not store.verify_key("ghost", key)
    record = json.loads((store.tenant_dir("acme") / "tenant.json").read_text())
    assert key not in json.dumps(record) and len(record["key_sha256"]) == 64  # only the hash at rest
    for bad in ("../etc", "a/b", "", "UPPER", "x" * 80, ".hidden", "a b"):
        with pytest.raises(StoreError, match="invalid tenant id"):
            store.add_tenant(bad, ["x"])
    with pytest.raises(StoreError, match="already exists"):
        store.add_tenant("acme", ["x"])
    with pytest.raises(StoreError, match="unique"):
        store.add_tenant("dup", ["a", "a"])
    with pytest.raises(StoreError, match="at least one class"):
        store.add_tenant("none", [])
    with pytest.raises(UnknownTenant):
        store.tenant("ghost")
    with pytest.raises(ValueError, match="θ must be"):
        store.update_tenant("acme", theta=2.0)
    assert store.update_tenant("acme", classes=["a", "b"], theta=0.7).theta == 0.7
    assert store.update_tenant("acme", clear_theta=True).theta is None
    new = store.rotate_key("acme")
    assert store.verify_key("acme", new) and not store.verify_key("acme", key)
    assert store.tenants() == ["acme"]


def test_concurrent_puts_each_get_a_version(tmp_path):
    store = PromptStore(tmp_path, FP, WIDTH, create=True)
    store.add_tenant("t1", ["x"])
    results = []

    def writer(seed):
        results.append(PromptStore(tmp_path, FP, WIDTH).put(ctx(seed), meta(), "t1").version)

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(results) == list(range(1, 9))
    assert store.versions("t1") == list(range(1, 9))
    assert store.current_version("t1") in results
    assert store.load("t1") is not None


def test_recover_removes_crash_leftovers_and_keeps_current(tmp_path):
    store = PromptStore(tmp_path, FP, WIDTH, create=True)
    store.add_tenant("t1", ["x"])
    store.put(ctx(1), meta(), "t1")
    # a crash after the temp file was written but before the rename (writes stage them in tmp/)
    (tmp_path / "tmp" / ".tmp-v000002.safetensors-dead").write_bytes(artifact_bytes(ctx(2), meta())[:50])
    (tmp_path / "tmp" / ".tmp-CURRENT-dead").write_bytes(b"2")
    assert PromptStore(tmp_path, FP, WIDTH).recover() == 2
    assert store.current_version("t1") == 1 and torch.equal(store.load("t1").ctx, ctx(1))
    assert store.put(ctx(3), meta(), "t1").version == 2


def test_delete_is_all_or_nothing_and_touches_no_other_tenant(tmp_path, monkeypatch):
    store = PromptStore(tmp_path, FP, WIDTH, create=True)
    keys = {t: store.add_tenant(t, ["red circle", "blue star"]) for t in ("t1", "t2")}
    for t in keys:
        store.put(ctx(1), meta(), t)
    (store.tenant_dir("t1") / "features").mkdir()
    (store.tenant_dir("t1") / "features" / "f.safetensors").write_bytes(b"x")
    t2_files = {p: p.read_bytes() for p in store.tenant_dir("t2").rglob("*") if p.is_file()}

    # a crash after the rename, before the folder is removed: the tenant is already gone as a whole
    import prompts_store.registry as registry_module

    monkeypatch.setattr(registry_module.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        store.delete_tenant("t1")
    monkeypatch.undo()
    with pytest.raises(UnknownTenant):
        store.tenant("t1")
    assert not store.verify_key("t1", keys["t1"]) and store.tenants() == ["t2"] and store.versions("t1") == []
    assert store.tenant_page(None, 10) == ["t2"]
    assert len(list((tmp_path / "tmp").glob("*deleted-t1-*"))) == 1
    assert store.recover() == 1 and not list((tmp_path / "tmp").iterdir())  # the next start finishes it
    # the id can be registered again and starts from nothing
    store.add_tenant("t1", ["a"])
    assert store.versions("t1") == [] and store.current_version("t1") is None
    store.delete_tenant("t1")
    with pytest.raises(UnknownTenant):
        store.delete_tenant("t1")
    assert {p: p.read_bytes() for p in store.tenant_dir("t2").rglob("*") if p.is_file()} == t2_files
    assert store.verify_key("t2", keys["t2"])


def test_tenant_pages_are_ascending_and_exclusive(tmp_path):
    store = PromptStore(tmp_path, FP, WIDTH, create=True)
    for t in ("c", "a", "b", "d"):
        store.add_tenant(t, ["x"])
    assert store.tenant_page(None, 2) == ["a", "b"]
    assert store.tenant_page("b", 2) == ["c", "d"]
    assert store.tenant_page("d", 2) == [] and store.tenant_page("0", 10) == ["a", "b", "c", "d"]
