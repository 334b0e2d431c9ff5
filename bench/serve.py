"""Serving benchmark, everything measured side by side in one run on this machine.

    .venv/bin/python bench/serve.py [--models tiny,vit-b-32] [--requests 240] [--concurrency 16]

For each model (the embedded tiny CLIP, and ViT-B-32 with random weights: speed only):
  a. raw image encoder, in-process, best batched throughput over backends and batch sizes
  b. the service end to end over HTTP (127.0.0.1): concurrent clients spread over tenants
  c. a naive baseline like the research code: the text encoder runs over the tenant's prompts
     (global and local, 100 classes) on every request, and images are encoded one at a time
  d. tenant scale (1 and 10,000 registered tenants; --scale to 1,000,000): server resident memory, a page of the tenant
     list over HTTP, and the cold-tenant overhead (a cold tenant's first classify minus its second)
  e. upload-to-serve: upload latency, then the next classify (which already uses the new version)
  f. (tiny, --cpu-workers) server CPU per request outside the encoder, single- and 32-image requests,
     multipart and JSON, for 1 and 2 workers: bench/request_cpu.py
Prints tables and the ratios b/a and b/c; writes results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import httpx  # noqa: E402
import psutil  # noqa: E402

from promptfolio import portfolio  # noqa: E402
from promptfolio.embedded import world  # noqa: E402
from promptfolio.encoder import load_encoder  # noqa: E402
from promptfolio.prompts import ZERO_SHOT_PHRASE, ClassPrompts, init_context  # noqa: E402
from prompts_store.artifact import PromptMeta, artifact_bytes  # noqa: E402
from prompts_store.store import PromptStore  # noqa: E402
from service.backends import OnnxImageBackend, TorchImageBackend  # noqa: E402
from service_helpers import ADMIN_KEY, Server, auth  # noqa: E402

MODELS = {"tiny": ("embedded", "embedded"), "vit-b-32": ("ViT-B-32", None)}
N_CLASSES = 100
CLASS_NAMES = [f"{size} {colour} {shape}" for size in world.SIZES for colour in world.COLOURS
               for shape in world.SHAPES][:N_CLASSES]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def jpeg_images(n: int, size: int) -> list[bytes]:
    images, _ = world.task_dataset(n, world.calibrated("noise"), seed=5)
    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).resize((size, size), Image.BILINEAR).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def raw_encoder(encoder, onnx_dir: Path, seconds: float) -> dict:
    size = encoder.image_size
    rows = {}
    for backend in (TorchImageBackend(encoder), OnnxImageBackend(encoder, onnx_dir)):
        for batch in (1, 8, 32):
            x = torch.randn(batch, 3, size, size)
            backend(x)
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                backend(x)
                n += batch
            rows[f"{backend.name} b{batch}"] = n / (time.perf_counter() - start)
    return rows


def naive_baseline(encoder, images: list[bytes], n: int) -> float:
    """Per request: text encoder over both prompts for all classes, then one image."""
    prompts = ClassPrompts(encoder, CLASS_NAMES, 4)
    g = init_context(encoder, phrase=ZERO_SHOT_PHRASE)
    loc = init_context(encoder, n_ctx=4, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(n):
            x = encoder.preprocess(Image.open(io.BytesIO(images[i % len(images)])).convert("RGB")).unsqueeze(0)
            text = portfolio.mix(prompts.encode(g), prompts.encode(loc), 0.4)
            portfolio.logits(encoder.model.encode_image(x), text, encoder.model.logit_scale).argmax()
    return n / (time.perf_counter() - start)


def local_artifact(encoder, seed: int) -> bytes:
    ctx = init_context(encoder, n_ctx=4, generator=torch.Generator().manual_seed(seed))
    return artifact_bytes(ctx, PromptMeta(kind="local", tenant="x", encoder=encoder.fingerprint, n_ctx=4,
                                          width=encoder.text_width, theta=0.4))


def server_rss(server: Server) -> float:
    proc = psutil.Process(server.proc.pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def start_server(base: Path, arch: str, pretrained: str | None, name: str) -> Server:
    # a throughput benchmark, not an overload test: the warm-up's cold tenants (text encoder, seconds each on
    # ViT-B-32) would otherwise make the admission gate shed the measured load (158 of 160 requests here)
    env = {"PROMPTFOLIO_ARCH": arch, "PROMPTFOLIO_PRETRAINED": pretrained or "none", "PROMPTFOLIO_MAX_BATCH": "32",
           "PROMPTFOLIO_ADMISSION_DEADLINE_S": "600"}
    return Server(base / name, base / f"{name}.log", **env).start(timeout=300)  # ONNX cache: base/onnx


async def load(server: Server, keys: dict[str, str], images: list[bytes], requests: int, concurrency: int):
    latencies: list[float] = []
    errors: list[str] = []
    tenants = list(keys)
    counter = iter(range(requests))

    async with httpx.AsyncClient(timeout=120) as client:
        async def worker():
            for i in counter:
                t = tenants[i % len(tenants)]
                start = time.perf_counter()
                r = await client.post(f"{server.url}/v1/tenants/{t}/classify", headers=auth(keys[t]),
                                      files=[("images", (f"{i}.jpg", images[i % len(images)], "image/jpeg"))])
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                    continue
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        elapsed = time.perf_counter() - start
    if errors:
        print(f"   {len(errors)} of {requests} requests failed, e.g. {errors[:3]}", flush=True)
    return len(latencies) / elapsed, latencies


def register(store: PromptStore, n: int, encoder, with_local: bool) -> dict[str, str]:
    keys = {}
    for i in range(n):
        tenant = f"t{i:05d}"
        keys[tenant] = store.add_tenant(tenant, CLASS_NAMES)
        if with_local:
            store.put_bytes(local_artifact(encoder, i), tenant)
    return keys


# ---- d. tenant scale -------------------------------------------------------------------------
registered: dict[int, tuple[dict[str, str], float]] = {}  # stores of part d, by tenant count
COLD_CLASSES = CLASS_NAMES[:10]  # cold tenants with their own local prompt: 10 classes keeps their uploads short


def bulk_register(store: PromptStore, n: int, chunk: int = 20_000) -> tuple[dict[str, str], float]:
    """`n` tenants through the store's bulk API (the same files as one at a time) -> (a few keys, seconds)."""
    keys, start = {}, time.perf_counter()
    for first in range(0, n, chunk):
        batch = [(f"t{i:07d}", CLASS_NAMES, None) for i in range(first, min(n, first + chunk))]
        made = store.add_tenants(batch)
        keys.update({t: made[t] for t in list(made)[:: max(1, n // 200)]})  # keep ~200 keys, not a million
        if n >= 100_000 and (first // chunk) % 10 == 9:
            print(f"   registered {first + len(batch):,} of {n:,} ({time.perf_counter() - start:.0f} s)", flush=True)
    return keys, time.perf_counter() - start


def prepare_cold_tenants(label: str, encoder, store_dir: Path, count: int) -> dict[str, str]:
    """Tenants with their own local prompt, uploaded through the service's write path in-process (which
    computes and persists their class features, as an upload over HTTP does)."""
    from service import writes
    from service.config import ServiceConfig
    from service.engine import Engine

    engine = Engine(ServiceConfig(store=store_dir, backend="torch"), encoder)
    try:
        keys = {}
        for i in range(count):
            tenant = f"cold-{label}-{i:03d}"
            keys[tenant] = writes.register(engine, tenant, COLD_CLASSES, None)[0]
            writes.upload_local(engine, tenant, local_artifact(encoder, 100 + i), allow_unpinned=True)
        return keys
    finally:
        engine.batcher.close()
        engine.decode_pool.close()


def engine_view_ms(encoder, store_dir: Path, tenants: list[str]) -> tuple[list[float], list[float]]:
    """The tenant-dependent part of a classify without HTTP and image noise: `Engine.view` of each tenant
    in a fresh engine (cold: records read, features loaded from disk), then again (warm)."""
    from service.config import ServiceConfig
    from service.engine import Engine

    engine = Engine(ServiceConfig(store=store_dir, backend="torch"), encoder)
    try:
        cold, warm = [], []
        for tenant in tenants:
            for times in (cold, warm):
                start = time.perf_counter()
                engine.view(tenant)
                times.append((time.perf_counter() - start) * 1e3)
        return cold, warm
    finally:
        engine.batcher.close()
        engine.decode_pool.close()


def measure_tenants(server: Server, keys: dict[str, str], cold_keys: dict[str, str], images: list[bytes], n: int,
                    cold_count: int) -> dict[str, list[float]]:
    """Over HTTP: pages of the tenant list, and first-minus-second classify of cold tenants (ms)."""
    with httpx.Client(timeout=600) as client:
        def classify_ms(tenant: str, key: str) -> float:
            begin = time.perf_counter()
            client.post(f"{server.url}/v1/tenants/{tenant}/classify", headers=auth(key),
                        files=[("images", ("x.jpg", images[0], "image/jpeg"))]).raise_for_status()
            return (time.perf_counter() - begin) * 1e3

        def page_ms(after: str | None) -> float:
            begin = time.perf_counter()
            r = client.get(f"{server.url}/v1/tenants", params={"limit": 100, **({"after": after} if after else {})},
                           headers=auth(ADMIN_KEY))
            r.raise_for_status()
            assert len(r.json()["tenants"]) == 100 or r.json()["next"] is None
            return (time.perf_counter() - begin) * 1e3

        tenants = list(keys)
        for _ in range(3):  # the service's own warm-up: encoder, shared global features, threads
            classify_ms(tenants[0], keys[tenants[0]])
        middle = f"t{n // 2:07d}" if n > 1 else None
        return {"pages": [page_ms(None) for _ in range(5)] + [page_ms(middle) for _ in range(5)],
                "shared": [classify_ms(t, keys[t]) - classify_ms(t, keys[t]) for t in tenants[1:][-cold_count:]],
                "own": [classify_ms(t, k) - classify_ms(t, k) for t, k in cold_keys.items()],
                # the same difference between two warm requests: the noise floor of the two above
                "noise": [classify_ms(t, k) - classify_ms(t, k) for t, k in cold_keys.items()]}


def tenant_scale(label: str, encoder, pretrained: str, images: list[bytes], base: Path, n: int, args) -> dict:
    """Register `n` tenants, start the server, then: its RSS, a page of the tenant list over HTTP, and
    the cold-tenant overhead (a cold tenant's first classify minus its second, same image)."""
    store_dir = base / f"scale{n}"  # registered once, shared by the models (records name no encoder)
    reused = store_dir.exists()
    store = PromptStore(store_dir, encoder.fingerprint, encoder.text_width, create=True)
    keys, reg_s = registered.get(n) or bulk_register(store, n)
    registered[n] = keys, reg_s
    cold_keys = prepare_cold_tenants(label, encoder, store_dir, args.cold_tenants)
    start = time.perf_counter()
    # the torch image backend: no ONNX export at start (the overhead measured is the tenant's, not the encoder's)
    server = Server(store_dir, base / f"{label}-scale{n}.log", PROMPTFOLIO_ARCH=MODELS[label][0],
                    PROMPTFOLIO_PRETRAINED=pretrained, PROMPTFOLIO_BACKEND="torch").start(timeout=600)
    ready_s = time.perf_counter() - start
    try:
        rss_ready = server_rss(server)
        ms = measure_tenants(server, keys, cold_keys, images, n, args.cold_tenants)
        rss_after = server_rss(server)
    finally:
        server.stop()
    view_cold, view_warm = engine_view_ms(encoder, store_dir, list(cold_keys))
    row = {"tenants": n, "register_s": reg_s, "store_reused": reused, "ready_s": ready_s, "rss_ready_mib": rss_ready,
           "rss_after_mib": rss_after, "page_p50_ms": pct(ms["pages"], 50), "page_max_ms": max(ms["pages"]),
           "cold_shared_n": len(ms["shared"]), "cold_own_n": len(ms["own"]),
           **{f"{kind}_p{q}_ms": pct(ms[source], q) for kind, source in
              (("cold_shared", "shared"), ("cold_own", "own"), ("warm_noise", "noise")) for q in (50, 90)},
           "view_cold_p50_ms": pct(view_cold, 50), "view_warm_p50_ms": pct(view_warm, 50)}
    print_scale_row(row)
    return row  # the stores go with the benchmark's folder at the end


def print_scale_row(row: dict) -> None:
    print(f"d. {row['tenants']:,} tenants (registered in {row['register_s']:.0f} s"
          f"{', store reused' if row['store_reused'] else ''}): ready in {row['ready_s']:.1f} s; server RSS "
          f"{row['rss_ready_mib']:.0f} MiB at ready, {row['rss_after_mib']:.0f} MiB after; a page of 100 tenants over "
          f"HTTP {row['page_p50_ms']:.1f} ms (p50, max {row['page_max_ms']:.1f}); cold-tenant overhead (first classify "
          f"minus second, same image): {row['cold_shared_p50_ms']:.1f} ms p50 / {row['cold_shared_p90_ms']:.1f} ms "
          f"p90 over {row['cold_shared_n']} tenants of the shared class list, {row['cold_own_p50_ms']:.1f} / "
          f"{row['cold_own_p90_ms']:.1f} ms over {row['cold_own_n']} with their own local prompt (features persisted "
          f"at upload); two warm requests differ by {row['warm_noise_p50_ms']:.1f} / {row['warm_noise_p90_ms']:.1f} ms "
          f"(noise floor); in-process Engine.view of those tenants: {row['view_cold_p50_ms']:.2f} ms cold, "
          f"{row['view_warm_p50_ms']:.2f} ms warm (p50)", flush=True)


def print_scale_table(models: list[dict]) -> None:
    print("\n| model | registered tenants | registration | ready | server RSS (ready / after) | page of 100 | "
          "cold overhead p50 / p90: shared classes | own local prompt | warm-warm noise | Engine.view cold / warm |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in models:
        for row in m.get("d_scale", {}).values():
            print(f"| {m['model']} | {row['tenants']:,} | {row['register_s']:.0f} s | {row['ready_s']:.1f} s | "
                  f"{row['rss_ready_mib']:.0f} / {row['rss_after_mib']:.0f} MiB | {row['page_p50_ms']:.1f} ms | "
                  f"{row['cold_shared_p50_ms']:.1f} / {row['cold_shared_p90_ms']:.1f} ms | "
                  f"{row['cold_own_p50_ms']:.1f} / {row['cold_own_p90_ms']:.1f} ms | "
                  f"{row['warm_noise_p50_ms']:.1f} / {row['warm_noise_p90_ms']:.1f} ms | "
                  f"{row['view_cold_p50_ms']:.2f} / {row['view_warm_p50_ms']:.2f} ms |")


def bench_model(label: str, args, base: Path) -> dict:
    arch, pretrained = MODELS[label]
    encoder = load_encoder(arch, pretrained)
    if pretrained is None:  # random weights: hand the server these exact weights as a checkpoint file
        pretrained = str(base / f"{label}.safetensors")
        save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, pretrained)
    images = jpeg_images(64, encoder.image_size)
    out: dict = {"model": label}
    print(f"\n== {label}: {arch} ({'random weights' if MODELS[label][1] is None else pretrained})", flush=True)
    if args.only_scale:
        out["d_scale"] = {n: tenant_scale(label, encoder, pretrained, images, base, n, args) for n in args.scale}
        return out

    out["a_raw"] = raw_encoder(encoder, base / "onnx", args.seconds)
    best_key = max(out["a_raw"], key=out["a_raw"].get)
    out["a_best"] = {"config": best_key, "images_per_s": out["a_raw"][best_key]}
    print("a. raw encoder images/s: " + ", ".join(f"{k} {v:.1f}" for k, v in out["a_raw"].items()), flush=True)

    store_dir = base / f"{label}-svc"
    store = PromptStore(store_dir, encoder.fingerprint, encoder.text_width, create=True)
    keys = register(store, args.tenants, encoder, with_local=True)
    server = start_server(base, arch, pretrained, f"{label}-svc")
    try:
        warm = asyncio.run(load(server, keys, images, len(keys), 4))  # computes (and persists) features
        del warm
        ips, lat = asyncio.run(load(server, keys, images, args.requests, args.concurrency))
        info = httpx.get(f"{server.url}/v1/info").json()
        out["b_service"] = {"images_per_s": ips, "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
                            "requests": args.requests, "concurrency": args.concurrency, "tenants": args.tenants,
                            "backend": info["backend"], "providers": info["providers"],
                            "mean_batch": info["batching"]["images"] / max(1, info["batching"]["batches"])}
        print(f"b. service: {ips:.1f} images/s, p50 {out['b_service']['p50_ms']:.0f} ms, "
              f"p99 {out['b_service']['p99_ms']:.0f} ms ({info['backend']} {info['providers']}, mean batch "
              f"{out['b_service']['mean_batch']:.1f})", flush=True)
        # e. upload-to-serve
        t0 = next(iter(keys))
        up, after = [], []
        with httpx.Client(timeout=300) as client:
            for i in range(args.uploads):
                start = time.perf_counter()
                r = client.post(f"{server.url}/v1/tenants/{t0}/prompt", headers=auth(keys[t0]),
                                files={"file": ("p.safetensors", local_artifact(encoder, 1000 + i))})
                r.raise_for_status()
                version = r.json()["version"]
                up.append(time.perf_counter() - start)
                start = time.perf_counter()
                c = client.post(f"{server.url}/v1/tenants/{t0}/classify", headers=auth(keys[t0]),
                                files=[("images", ("x.jpg", images[0], "image/jpeg"))])
                assert c.json()["local_version"] == version
                after.append(time.perf_counter() - start)
        out["e_upload"] = {"upload_p50_ms": pct(up, 50) * 1e3, "upload_p99_ms": pct(up, 99) * 1e3,
                           "next_classify_p50_ms": pct(after, 50) * 1e3, "next_classify_p99_ms": pct(after, 99) * 1e3,
                           "uploads": args.uploads}
        print(f"e. upload {out['e_upload']['upload_p50_ms']:.0f}/{out['e_upload']['upload_p99_ms']:.0f} ms "
              f"(p50/p99, features computed before it returns); next classify already on the new version "
              f"{out['e_upload']['next_classify_p50_ms']:.0f}/{out['e_upload']['next_classify_p99_ms']:.0f} ms",
              flush=True)
    finally:
        server.stop()

    out["c_naive"] = {"images_per_s": naive_baseline(encoder, images, args.naive_requests)}
    print(f"c. naive baseline: {out['c_naive']['images_per_s']:.2f} images/s", flush=True)

    out["d_scale"] = {n: tenant_scale(label, encoder, pretrained, images, base, n, args) for n in args.scale}

    out["ratio_b_over_a"] = out["b_service"]["images_per_s"] / out["a_best"]["images_per_s"]
    out["ratio_b_over_c"] = out["b_service"]["images_per_s"] / out["c_naive"]["images_per_s"]
    print(f"b/a = {out['ratio_b_over_a']:.2f}   b/c = {out['ratio_b_over_c']:.1f}", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,vit-b-32")
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tenants", type=int, default=20, help="tenants the load is spread over")
    parser.add_argument("--uploads", type=int, default=8)
    parser.add_argument("--naive-requests", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=4.0, help="per raw-encoder configuration")
    parser.add_argument("--scale", default="1,10000", help="registered tenants, one run per count (1000000: the million, most of an hour)")
    parser.add_argument("--cold-tenants", type=int, default=30, help="cold tenants measured per scale and kind")
    parser.add_argument("--only-scale", action="store_true", help="run only part d (tenant scale)")
    parser.add_argument("--cpu-workers", default="1,2", help="f: worker counts ('' skips part f)")
    parser.add_argument("--cpu-seconds", type=float, default=8.0, help="f: seconds per measured phase")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-serve"))
    args = parser.parse_args()
    args.scale = [int(s) for s in args.scale.split(",") if s]  # "" skips part d
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = Path(tempfile.mkdtemp(prefix="pf-bench-serve-"))
    results = {"machine": f"{os.cpu_count()} CPU cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, no GPU",
               "torch_threads": torch.get_num_threads(), "models": []}
    try:
        for label in args.models.split(","):
            results["models"].append(bench_model(label, args, base))
        if args.cpu_workers and "tiny" in args.models.split(",") and not args.only_scale:
            import request_cpu

            print("\n== f. server CPU per request outside the encoder (tiny model, encoder on one thread)", flush=True)
            results["f_request_cpu"] = request_cpu.run("tiny", tuple(int(w) for w in args.cpu_workers.split(",")),
                                                       args.cpu_seconds)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("\n| model | a. raw encoder (best) | b. service over HTTP | p50 / p99 | c. naive | b/a | b/c |")
    print("|---|---|---|---|---|---|---|")
    for m in (m for m in results["models"] if "b_service" in m):
        print(f"| {m['model']} | {m['a_best']['images_per_s']:.1f} img/s ({m['a_best']['config']}) | "
              f"{m['b_service']['images_per_s']:.1f} img/s | {m['b_service']['p50_ms']:.0f} / "
              f"{m['b_service']['p99_ms']:.0f} ms | {m['c_naive']['images_per_s']:.2f} img/s | "
              f"{m['ratio_b_over_a']:.2f} | {m['ratio_b_over_c']:.0f} |")
    print_scale_table(results["models"])
    if results.get("f_request_cpu"):
        import request_cpu

        request_cpu.print_table(results["f_request_cpu"])
        load = psutil.getloadavg()
        print(f"load average (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n{results['machine']}; results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
