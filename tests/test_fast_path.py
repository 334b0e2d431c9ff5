"""The fast path: ONNX Runtime image encoder parity, providers, batching and backpressure."""

import asyncio
import io
import time

import httpx
import pytest
import torch
from PIL import Image

from promptfolio.embedded import evaluate, world
from service.api import create_app
from service.backends import BackendError, OnnxImageBackend, TorchImageBackend, make_backend, onnx_path
from service.admission import AdmissionGate
from service.batcher import REQUEST_CLOCK, FairPool, MicroBatcher, Overloaded, RequestClock
from service.config import ServiceConfig
from service.engine import Engine


def test_onnx_matches_torch_and_reports_real_providers(embedded_encoder, tmp_path):
    onnx = OnnxImageBackend(embedded_encoder, tmp_path)
    assert onnx.providers == ["CPUExecutionProvider"]  # what the session uses, not what is installed
    assert onnx.path == onnx_path(embedded_encoder, tmp_path) and onnx.path.is_file()
    images, _ = world.task_dataset(7, world.calibrated("noise"), seed=0)
    x = evaluate.to_model_input(images, embedded_encoder.image_mean, embedded_encoder.image_std)
    for batch in (x[:1], x):  # the batch axis is dynamic
        diff = (onnx(batch) - TorchImageBackend(embedded_encoder)(batch)).abs().max().item()
        assert diff <= 1e-4, diff
    # a second backend reuses the cached export
    stamp = onnx.path.stat().st_mtime_ns
    assert OnnxImageBackend(embedded_encoder, tmp_path).path.stat().st_mtime_ns == stamp


def test_backend_choice(embedded_encoder, tmp_path):
    assert make_backend("torch", embedded_encoder, tmp_path).name == "torch"
    assert make_backend("auto", embedded_encoder, tmp_path).name == "onnxruntime"
    with pytest.raises(BackendError, match="unknown backend"):
        make_backend("tpu", embedded_encoder, tmp_path)


def test_batcher_merges_concurrent_requests_and_refuses_overload():
    calls = []

    def encode(x):
        calls.append(x.shape[0])
        time.sleep(0.05)
        return x.flatten(1)[:, :2]

    async def scenario():
        batcher = MicroBatcher(encode, max_batch=16, max_wait_ms=20, max_pending_images=12)
        results = await asyncio.gather(*[batcher.encode(torch.full((2, 1, 1, 2), float(i))) for i in range(6)])
        assert [r[:, 0].tolist() for r in results] == [[float(i)] * 2 for i in range(6)]
        assert batcher.batches < 6  # requests were merged
        with pytest.raises(Overloaded) as info:
            await asyncio.gather(*[batcher.encode(torch.zeros(5, 1, 1, 2)) for _ in range(3)])
        assert info.value.retry_after_s >= 1
        batcher.close()

    asyncio.run(scenario())
    assert max(calls) > 2


def test_a_request_that_would_finish_past_the_deadline_is_shed_in_the_queue():
    """The admission gate's estimate can be short; a job whose wait so far (age less its own decode
    work) plus the batches it will span ends past the deadline is refused when it would start,
    and the others go on (the batcher's loop survives a turn where every job was late)."""
    def encode(x):
        time.sleep(0.02)
        return x.flatten(1)[:, :2]

    async def scenario():
        now = time.monotonic()
        batcher = MicroBatcher(encode, max_batch=4, max_wait_ms=1, max_pending_images=64, deadline_s=1.0)
        fresh = RequestClock(now)
        stale = RequestClock(now - 1.5)  # waited 1.5 s in the kernel before the app saw it
        busy = RequestClock(now - 1.5)
        busy.own_work_s = 1.4  # most of that was its own decoding: it waited 0.1 s
        results = await asyncio.gather(*[batcher.encode(torch.zeros(n, 1, 1, 2), key=k, clock=c)
                                         for n, k, c in ((2, "a", fresh), (1, "b", stale), (3, "c", busy))],
                                       return_exceptions=True)
        assert isinstance(results[1], Overloaded) and "deadline" in str(results[1])
        assert results[0].shape == (2, 2) and results[2].shape == (3, 2)
        assert batcher.shed_in_queue == 1 and batcher.pending_images == 0
        # only late jobs queued: none encoded, the loop still serves the next request
        late = await asyncio.gather(*[batcher.encode(torch.zeros(1, 1, 1, 2), key=f"t{i}",
                                                     clock=RequestClock(time.monotonic() - 2)) for i in range(3)],
                                    return_exceptions=True)
        assert all(isinstance(r, Overloaded) for r in late) and batcher.shed_in_queue == 4
        assert (await batcher.encode(torch.zeros(1, 1, 1, 2), clock=RequestClock(time.monotonic()))).shape == (1, 2)
        batcher.close()

    asyncio.run(scenario())


def test_decode_workers_add_their_time_to_the_requests_clock():
    pool = FairPool(2)

    async def request(seconds: float) -> RequestClock:
        clock = RequestClock(time.monotonic())
        REQUEST_CLOCK.set(clock)  # as Engine.classify does, in the request's own task
        await asyncio.gather(*[pool.run("t", lambda: time.sleep(seconds)) for _ in range(2)])
        return clock

    async def scenario():
        return await asyncio.gather(request(0.05), request(0.0))

    try:
        slow, quick = asyncio.run(scenario())
    finally:
        pool.close()
    assert 0.09 <= slow.own_work_s < 0.2 and quick.own_work_s < 0.01  # each request's own work only


def test_a_tenants_small_request_does_not_wait_behind_its_own_large_one():
    """Within a tenant, requests are served in order, but the light-only decode worker takes the
    first light task of any of the tenant's requests: a small request's image is not queued behind
    the same tenant's heavy ones."""
    async def request(pool: FairPool, tasks: int, heavy: bool, seconds: float = 0.2) -> float:
        REQUEST_CLOCK.set(RequestClock(time.monotonic()))  # a request is known by its clock
        start = time.perf_counter()
        await asyncio.gather(*[pool.run("acme", lambda: time.sleep(seconds), heavy=heavy) for _ in range(tasks)])
        return time.perf_counter() - start

    async def small_beside_large(pool: FairPool) -> tuple[float, float]:
        large = asyncio.create_task(request(pool, 4, heavy=True))
        await asyncio.sleep(0.05)
        return await request(pool, 1, heavy=False), await large

    async def burst(pool: FairPool) -> list[float]:
        return await asyncio.gather(*[request(pool, 2, heavy=True, seconds=0.05) for _ in range(6)])

    pool = FairPool(2)
    try:
        small, large = asyncio.run(small_beside_large(pool))
        finished = asyncio.run(burst(pool))
    finally:
        pool.close()
    assert small < 0.35 < large, (small, large)  # was: after all 4 heavy tasks (0.8 s)
    # a burst of one tenant's requests is served in order (sharing would finish all of them last)
    assert finished == sorted(finished) and finished[0] < 0.2 < finished[-1], finished


def test_the_decode_pool_refuses_work_already_past_the_deadline():
    ran = []

    async def request(tasks: int) -> None:
        REQUEST_CLOCK.set(RequestClock(time.monotonic()))
        await asyncio.gather(*[pool.run("acme", lambda: ran.append(tasks) or time.sleep(0.2), heavy=True)
                               for _ in range(tasks)])

    async def scenario():
        first = asyncio.create_task(request(3))
        await asyncio.sleep(0.01)
        late = await asyncio.gather(request(1), return_exceptions=True)
        await first
        return late[0]

    pool = FairPool(1, deadline_s=0.3)
    try:
        late = asyncio.run(scenario())
    finally:
        pool.close()
    # it waited 0.6 s behind the first request: refused when its turn came, without decoding
    assert isinstance(late, Overloaded) and "deadline" in str(late), late
    assert ran == [3, 3, 3] and pool.shed_late == 1


def test_the_gate_forgets_old_waits():
    gate = AdmissionGate(deadline_s=1.0)
    gate.RECENT_S = 0.2
    gate.admit()
    gate.done(5.0)  # a burst's request that waited 5 s in the app
    gate.admit()  # in flight: the next one expects to wait as long
    with pytest.raises(Overloaded):
        gate.admit()
    time.sleep(0.25)
    gate.admit()  # forgotten: a past burst does not shed the requests after it


def test_saturated_service_answers_503_with_retry_after(embedded_encoder, tmp_path):
    cfg = ServiceConfig(store=tmp_path / "store", admin_key="adm", backend="torch", max_pending_images=2,
                        max_wait_ms=1)
    engine = Engine(cfg, embedded_encoder)
    slow = engine.batcher.encode_fn
    engine.batcher.encode_fn = lambda x: (time.sleep(0.3), slow(x))[1]
    app = create_app()
    app.state.engine = engine
    key = engine.store.add_tenant("busy", ["red circle", "blue star"])
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, "PNG")

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            async def one():
                return await client.post("/tenants/busy/classify", headers={"Authorization": f"Bearer {key}"},
                                         files=[("images", ("a.png", buf.getvalue(), "image/png"))])
            return await asyncio.gather(*[one() for _ in range(8)])

    responses = asyncio.run(scenario())
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes, codes
    refused = next(r for r in responses if r.status_code == 503)
    assert int(refused.headers["Retry-After"]) >= 1 and "queue is full" in refused.json()["error"]
    engine.batcher.close()


def test_cold_tenant_loads_persisted_features_instead_of_encoding(embedded_encoder, tmp_path, monkeypatch):
    cfg = ServiceConfig(store=tmp_path / "store", backend="torch")
    first = Engine(cfg, embedded_encoder)
    first.store.add_tenant("cold", ["red circle", "blue star", "green cross"])
    warm = first.view("cold")
    assert not warm.cache_hit and list((tmp_path / "store").glob("**/features/*.safetensors"))

    import service.engine as engine_module

    def no_text_encoding(*args, **kwargs):
        raise AssertionError("the text encoder ran on the request path")

    monkeypatch.setattr(engine_module, "encode_classes", no_text_encoding)
    restarted = Engine(cfg, embedded_encoder)  # a restart: empty memory cache, same store
    view = restarted.view("cold")
    assert torch.equal(view.t_global, warm.t_global)
    # a damaged file is ignored and recomputed, never served
    for path in (tmp_path / "store").glob("**/features/*.safetensors"):
        path.write_bytes(b"garbage")
    monkeypatch.undo()
    again = Engine(cfg, embedded_encoder).view("cold")
    assert torch.allclose(again.t_global, warm.t_global, atol=1e-6)


def test_the_worker_freezes_what_exists_at_start_out_of_the_collector():
    # in a fresh interpreter: gc.freeze() is process-wide
    import subprocess
    import sys

    code = ("import gc, service.service as s, torch; s.quiet_collector(10_000); "
            "print(gc.get_freeze_count(), gc.get_threshold()[0], len(gc.get_objects(generation=2)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    frozen, threshold, left = map(int, out)
    assert frozen > 50_000 and threshold == 10_000 and left < frozen // 100, out
