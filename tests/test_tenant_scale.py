"""Many tenants: pages of the index, the fan-out migration of an old flat store (and a crash in the
middle of it), and a cold tenant served exactly like a warm one. Real files, a real server."""

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from conftest import REPO
from prompts_store.errors import StoreError
from prompts_store.store import PromptStore
from prompts_store.tenant_index import flat_tenant_folders, shard
from promptfolio.prompts import init_context
from prompts_store.errors import Unservable
from service import writes
from service.config import ServiceConfig
from service.engine import Engine
from service_helpers import ADMIN_KEY, Server, auth
from test_portfolio import LONG_NAME, SHORT, ctx_of, global_bytes
from test_portfolio import engine  # noqa: F401 - a fixture
from test_service import ACME, classify, images_for, local_artifact


def flat_store(built, root) -> None:
    """The store `built` rewritten at `root` in the layout of the code before fan-out: the same files
    in `tenants/<id>/` folders, no index, no tmp/ (folders move: removing thousands is slow here)."""
    store = PromptStore(built)
    (root / "tenants").mkdir(parents=True)
    os.rename(built / "global", root / "global")
    for tenant in store.tenants():
        os.rename(store.tenant_dir(tenant), root / "tenants" / tenant)


def _try_add(store: PromptStore, tenant: str) -> str:
    try:
        store.add_tenant(tenant, ["a"])
        return "registered"
    except StoreError as e:
        assert "already exists" in str(e)
        return "exists"


def test_pages_list_every_tenant_once_in_order(tmp_path):
    store = PromptStore(tmp_path, create=True)
    ids = [f"t{i:05d}" for i in range(2500)]
    keys = store.add_tenants([(t, ["a", "b"], None) for t in reversed(ids)])
    keys["m-solo"] = store.add_tenant("m-solo", ["c"])
    store.index.add(["m-ghost"])  # a registration that crashed after the index, before its folder
    expected = sorted([*ids, "m-solo"])

    seen, after = [], None
    while page := store.tenant_page(after, 100):
        assert len(page) <= 100
        seen += page
        after = page[-1]
    assert seen == expected  # every id once, ascending, the ghost skipped
    assert store.tenant_page("m", 3) == ["m-solo", "t00000", "t00001"]  # any string is a cursor
    assert store.tenants() == expected and store.verify_key("t01234", keys["t01234"])
    assert len(list(store.index.class_lists())) == 2  # what a global publish checks: 2 lists, not 2,501 tenants
    with pytest.raises(StoreError, match="already exist"):
        store.add_tenants([("t00007", ["a"], None)])
    with pytest.raises(StoreError, match="at least one"):
        store.tenant_page(None, 0)

    outcomes = []  # registrations of one id racing: exactly one wins, the others are told it exists
    racers = [threading.Thread(target=lambda: outcomes.append(_try_add(store, "racer"))) for _ in range(8)]
    [t.start() for t in racers]
    [t.join() for t in racers]
    assert sorted(outcomes) == ["exists"] * 7 + ["registered"]

    store.delete_tenant("t00001")
    assert store.tenant_page("t00000", 2) == ["t00002", "t00003"]
    assert not store.tenant_dir("t00001").exists() and not store.verify_key("t00001", keys["t00001"])
    assert store.add_tenant("t00001", ["z"])  # the id is free again


def test_flat_store_migrates_and_cold_tenants_serve_like_warm(tmp_path, embedded_encoder):
    enc = embedded_encoder
    root = tmp_path / "store"
    built = Engine(ServiceConfig(store=tmp_path / "built", backend="torch"), encoder=enc)
    keys = built.store.add_tenants([(f"bulk-{i:03d}", ACME, None) for i in range(300)])
    for i in range(3):  # uploads through the service's write path: their class features are persisted
        keys[f"own-{i}"] = writes.register(built, f"own-{i}", ACME, None)[0]
        ctx = init_context(enc, n_ctx=4, generator=torch.Generator().manual_seed(i))
        writes.upload_local(built, f"own-{i}", local_artifact(enc, ctx, theta=0.6), allow_unpinned=True)
    built.batcher.close()
    flat_store(tmp_path / "built", root)
    assert len(flat_tenant_folders(root / "tenants")) == 303
    assert list((root / "tenants" / "own-0" / "features").glob("*.safetensors"))
    (root / "tenants" / "own-0" / ".tmp-CURRENT-dead").write_bytes(b"torn")  # an old crash's leftover

    server = Server(root, tmp_path / "server.log").start()  # its store opens: the migration runs
    try:
        listed, after = [], None
        while True:
            r = httpx.get(f"{server.url}/v1/tenants", params={"limit": 64, **({"after": after} if after else {})},
                          headers=auth(ADMIN_KEY))
            assert r.status_code == 200, r.text
            listed += r.json()["tenants"]
            if (after := r.json()["next"]) is None:
                break
        assert listed == sorted(keys)
        images = images_for(ACME, n=2)
        for tenant in ("own-0", "own-2", "bulk-299"):  # cold: features from disk, scores equal to warm
            cold = classify(server, tenant, keys[tenant], images).json()
            warm = classify(server, tenant, keys[tenant], images).json()
            assert "predictions" in cold and cold["predictions"] == warm["predictions"], cold
            assert cold["local_version"] == (1 if tenant.startswith("own") else None)
    finally:
        server.stop()
    assert flat_tenant_folders(root / "tenants") == []
    assert not (root / "tenants" / shard("own-0") / "own-0" / ".tmp-CURRENT-dead").exists()


MIGRATE = "import sys; from prompts_store.store import PromptStore; PromptStore(sys.argv[1])"


def _kill_mid_migration(built, root, first: str) -> int:
    """Copy `built` as a flat store at `root`, start a process opening it (which migrates), SIGKILL it
    once the first tenant has moved; returns how many tenant folders were still in the old layout."""
    flat_store(built, root)
    moved = root / "tenants" / shard(first) / first
    proc = subprocess.Popen([sys.executable, "-c", MIGRATE, str(root)], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    while not moved.exists() and proc.poll() is None:
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return len(flat_tenant_folders(root / "tenants"))


def test_a_crash_during_migration_loses_no_tenant(tmp_path):
    ids = [f"c{i:04d}" for i in range(3000)]
    for attempt in range(3):  # a kill that comes too late (all moved) on a descheduled runner: try again
        built, root = tmp_path / f"built{attempt}", tmp_path / f"s{attempt}"
        keys = PromptStore(built, create=True).add_tenants([(t, ["a", "b"], 0.3) for t in ids])
        left = _kill_mid_migration(built, root, ids[0])
        if left:
            break
    assert 0 < left < len(ids), "the migration always finished before the kill"

    reopened = PromptStore(root)
    assert reopened.migrated == left and flat_tenant_folders(root / "tenants") == []
    assert reopened.tenants() == ids
    assert all(reopened.verify_key(t, keys[t]) for t in ids[::97])
    assert reopened.tenant("c2999").theta == 0.3


def test_a_global_publish_computes_each_class_list_once_not_each_tenant(engine, embedded_encoder):
    enc = embedded_encoder
    engine.store.add_tenants([(f"f{i:04d}", SHORT if i % 2 else ["x", "y"], None) for i in range(1000)])
    engine.store.add_tenant("cli-added", ["x", LONG_NAME])  # unservable with any global: blocks nothing
    result = writes.publish_global(engine, global_bytes(enc, ctx_of(enc, 3)))
    assert result.notes == ["computed its class features for the 2 class list(s) tenants use"]
    follower = engine.view("f0999")  # never served before: its new global features are ready
    assert follower.cache_hit and follower.global_version == 1
    # a global that leaves room for one-token names only breaks the 500 followers with longer ones
    with pytest.raises(Unservable, match=r"would break 500 tenant\(s\).*f0001: "):
        writes.publish_global(engine, global_bytes(enc, ctx_of(enc, 4, n_ctx=27)))
    assert engine.store.current_version(None) == 1
