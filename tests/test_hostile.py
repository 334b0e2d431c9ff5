"""The request path under attack and overload, against the real server over HTTP (issue 10).

Each test reproduces a measured problem at a small scale and shows it gone: bodies read before
authentication (and chunked bodies past the cap), images whose resize explodes, one request
stalling other tenants, overload growing latency instead of shedding, slow clients held forever,
booleans taken as numbers and null scores. Times are compared side by side, never absolutely.
"""

import asyncio
import io
import select
import socket
import statistics
import sys
import threading
import time

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from promptfolio.prompts import init_context
from prompts_store.artifact import PromptMeta, artifact_bytes
from conftest import REPO
from service_helpers import ADMIN_KEY, Server, auth, png_bytes

sys.path.insert(0, str(REPO / "bench"))
import overload  # noqa: E402  (the benchmark's raw HTTP load generator: cheap enough to overload the server)

CLASSES = ["red circle", "blue star", "green square"]
HEADER_TIMEOUT, BODY_TIMEOUT, MAX_CONNECTIONS, DEADLINE = 2.0, 3.0, 48, 0.5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    spool = base / "tmp"
    spool.mkdir()
    srv = Server(base / "store", base / "server.log", TMPDIR=str(spool),
                 PROMPTFOLIO_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT), PROMPTFOLIO_BODY_TIMEOUT_S=str(BODY_TIMEOUT),
                 PROMPTFOLIO_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
                 PROMPTFOLIO_ADMISSION_DEADLINE_S=str(DEADLINE)).start()
    srv.spool = spool
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def keys(server):
    out = {}
    for tenant in ("acme", "globex"):
        r = httpx.post(f"{server.url}/v1/tenants", json={"tenant": tenant, "classes": CLASSES}, headers=auth(ADMIN_KEY))
        assert r.status_code == 201, r.text
        out[tenant] = r.json()["api_key"]
    return out


def worker(server) -> psutil.Process:
    """The BentoML worker process (the one that holds the engine)."""
    tree = psutil.Process(server.proc.pid).children(recursive=True)
    return next(p for p in tree if "_bentoml_impl.worker" in " ".join(p.cmdline()))


def png(mode: str, w: int, h: int, value=128) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), value).save(buf, "PNG")
    return buf.getvalue()


def classify(server, tenant, key, images, timeout=120, **form):
    files = [("images", (f"i{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return httpx.post(f"{server.url}/v1/tenants/{tenant}/classify", files=files, data=form, headers=auth(key),
                      timeout=timeout)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def stream_body(server, head: bytes, total: int, chunked: bool, first: bytes = b"") -> tuple[str, int, str]:
    """Send headers then up to `total` body bytes, stopping when the server answers.

    Returns (status line, body bytes sent, the whole answer)."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.settimeout(30)
    sock.sendall(head + (b"%x\r\n%s\r\n" % (len(first), first) if chunked and first else first))
    block, sent = b"\0" * 65536, 0
    try:
        while sent < total and not select.select([sock], [], [], 0)[0]:
            piece = b"%x\r\n%s\r\n" % (len(block), block) if chunked else block
            sock.sendall(piece)
            sent += len(block)
    except OSError:  # the server closed after answering
        pass
    answer = b""
    try:
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            piece = sock.recv(4096)
            if not piece:
                break
            answer += piece
    except OSError:
        pass
    finally:
        sock.close()
    return answer.decode("latin-1").split("\r\n")[0], sent, answer.decode("latin-1")


def test_bodies_are_refused_from_the_headers_and_counted_as_they_stream(server, keys):
    rss = worker(server).memory_info().rss
    big = 400 << 20
    # was: an unauthenticated chunked PATCH was read in full (+2.4 GiB) and answered 422
    status, sent, answer = stream_body(server, b"PATCH /v1/tenants/acme HTTP/1.1\r\nHost: x\r\n"
                                       b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
                                       big, chunked=True)
    assert " 401 " in status and "missing API key" in answer and sent < big // 10, (status, sent)
    # was: a chunked multipart upload without a key spooled ~all of it to /tmp before the 401
    status, sent, _ = stream_body(server, b"POST /v1/tenants/acme/prompt HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                  b"multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n",
                                  big, chunked=True)
    assert " 401 " in status and sent < big // 10, (status, sent)
    # with a valid key, chunked bodies stop at the route's limit (1 MiB for JSON) instead of the whole body
    status, sent, answer = stream_body(server, b"PATCH /v1/tenants/acme HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                       + keys["acme"].encode() + b"\r\nContent-Type: application/json\r\n"
                                       b"Transfer-Encoding: chunked\r\n\r\n", big, chunked=True)
    assert " 413 " in status and "1048576-byte limit" in answer and sent < big // 10, (status, sent)
    status, sent, _ = stream_body(server, b"POST /v1/tenants/acme/classify HTTP/1.1\r\nHost: x\r\nAuthorization: "
                                  b"Bearer " + keys["acme"].encode() + b"\r\nContent-Type: multipart/form-data; "
                                  b"boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n", big, chunked=True,
                                  first=b'--b\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n'
                                        b"Content-Type: image/png\r\n\r\n")
    assert " 413 " in status and sent < big // 2, (status, sent)  # at the 64 MiB classify limit
    # another tenant's key: 403 before the body, a declared length over the limit: 413 before the body
    status, sent, _ = stream_body(server, b"PATCH /v1/tenants/globex HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                  + keys["acme"].encode() + b"\r\nContent-Length: %d\r\n\r\n" % big, big, chunked=False)
    assert " 403 " in status and sent < big // 10
    status, sent, _ = stream_body(server, b"POST /v1/tenants/acme/prompt HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                  + keys["acme"].encode() + b"\r\nContent-Length: %d\r\n\r\n" % big, big, chunked=False)
    assert " 413 " in status and sent < big // 10
    assert worker(server).memory_info().rss - rss < 64 << 20  # was +2.4 GiB
    assert sum(p.stat().st_size for p in server.spool.rglob("*") if p.is_file()) < 4 << 20  # nothing spooled
    # the server still serves
    assert classify(server, "acme", keys["acme"], [png("RGB", 64, 64)]).status_code == 200


def test_image_work_is_bounded_from_the_header(server, keys):
    small, proc = png("RGB", 64, 64, (200, 30, 30)), worker(server)
    base = statistics.median(timed(classify, server, "acme", keys["acme"], [small])[1] for _ in range(3))
    for (w, h), reason in [((1, 80_000), "per side"), ((1, 10_000), "aspect ratio"), ((6000, 6000), "decodes to"),
                           ((1, 16_000), "aspect ratio"),
                           ((16_000, 6_000), "96000000 pixels exceeds the limit")]:  # was 400 (Pillow's own check)
        rss = proc.memory_info().rss
        r, seconds = timed(classify, server, "acme", keys["acme"], [png("1", w, h, 1)])
        assert r.status_code == 413 and reason in r.json()["error"], r.text
        assert seconds < 10 * base + 0.5  # refused from the header (was 7.2 s and +1.5 GiB for 1x80,000)
        assert proc.memory_info().rss - rss < 16 << 20
    r = classify(server, "acme", keys["acme"], [png("1", 2001, 100, 1)])  # just over 20:1, not rounded to it
    assert r.status_code == 413 and "aspect ratio of 20.01:1, over the limit of 20:1" in r.json()["error"], r.text
    # the widest legal strip (20:1) and large legal images: the worker does not grow request after request
    for image in (png("RGB", 200, 4000), png("RGB", 4000, 4000), png("1", 4000, 4000, 1)):
        assert classify(server, "acme", keys["acme"], [image]).status_code == 200  # first use sizes the allocator
        rss = proc.memory_info().rss
        for _ in range(3):
            r = classify(server, "acme", keys["acme"], [image])
            assert r.status_code == 200, r.text
        assert proc.memory_info().rss - rss < 16 << 20  # the decoded buffers are released after each image


def test_exif_orientation_is_applied(server, keys):
    rng = np.random.default_rng(0)
    upright = np.zeros((64, 48, 3), np.uint8)
    upright[:32] = (220, 20, 20)
    upright[32:] = rng.integers(0, 255, (32, 48, 3))
    # the same pixels stored rotated, with EXIF orientation 6 ("rotate 90° clockwise to display")
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged, untagged = io.BytesIO(), io.BytesIO()
    stored.save(tagged, "PNG", exif=exif)
    stored.save(untagged, "PNG")
    scores = [classify(server, "acme", keys["acme"], [data], top_k=3).json()["predictions"][0]["top"]
              for data in (png_bytes(upright), tagged.getvalue(), untagged.getvalue())]
    assert scores[1] == scores[0]  # EXIF-rotated decodes to the upright pixels
    assert scores[2] != scores[0]  # (and the rotation matters to the model)


def test_a_large_request_does_not_stall_other_tenants(server, keys):
    probe = [png("RGB", 64, 64, (30, 30, 200))]
    idle = [timed(classify, server, "globex", keys["globex"], probe)[1] for _ in range(8)]
    heavy = [png("RGB", 4000, 4000, (90, 90, 90))] * 12  # legal, 16 M pixels each
    done = {}
    thread = threading.Thread(target=lambda: done.update(r=timed(classify, server, "acme", keys["acme"], heavy)))
    thread.start()
    time.sleep(0.3)
    busy, own = [], []  # probes from another tenant, and from the large request's own tenant
    while thread.is_alive() and len(busy) < 40:
        for tenant, times in (("globex", busy), ("acme", own)):
            r, seconds = timed(classify, server, tenant, keys[tenant], probe)
            assert r.status_code == 200, r.text  # was, for acme: 503 after waiting out the large request
            times.append(seconds)
    thread.join()
    (r, heavy_seconds) = done["r"]
    assert r.status_code == 200 and len(r.json()["predictions"]) == 12
    assert len(busy) >= 3, busy  # the probe ran many times while the large request was served
    # was: the probe waited for the whole large request; now it waits for at most an image in progress
    assert max(busy) < heavy_seconds / 3, (max(busy), heavy_seconds)
    assert max(own) < heavy_seconds / 3, (max(own), heavy_seconds)  # turns between a tenant's requests too
    assert statistics.median(busy) < 3 * statistics.median(idle) + 0.05, (busy, idle)


def test_overload_is_shed_with_retry_after_and_every_connection_answered(server):
    r = httpx.post(f"{server.url}/v1/tenants", json={"tenant": "busy", "classes": CLASSES}, headers=auth(ADMIN_KEY))
    content_type, body = overload.multipart([png("RGB", 200, 200, (200, 30, 30))] * 4)
    request = overload.request_bytes("/v1/tenants/busy/classify", r.json()["api_key"], content_type, body)
    capacity = asyncio.run(overload.closed_loop(server.port, [request], 16, 2.0))
    # twice what the server can do for 8 s: without shedding the queue grows by a second every second,
    # so the last tenth of the requests would wait about 7 s
    seconds = 8.0
    results = asyncio.run(overload.open_loop(server.port, [request], 2 * capacity, seconds))
    row = overload.summarize(results, 2 * capacity, seconds)
    assert row["failed"] == 0 and not row["other_status"], (row["failures"], row["failed"], row)  # every connection got an HTTP answer
    assert 0.2 < row["shed_fraction"] < 0.95 and row["retry_after_s"], row  # 503 + Retry-After
    admitted = sorted(s for status, s, _ in results if status == 200)
    assert admitted[int(0.9 * (len(admitted) - 1))] < seconds / 3 + 3 * DEADLINE, row


def test_slow_clients_are_timed_out_and_connections_capped(server, keys):
    # headers trickled one line a second: answered 408 and closed after the header timeout
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.settimeout(3 * HEADER_TIMEOUT + 5)
    start = time.perf_counter()
    sock.sendall(b"GET /v1/info HTTP/1.1\r\nHost: x\r\n")
    answer = b""
    try:
        while not select.select([sock], [], [], 0.5)[0] and time.perf_counter() - start < 3 * HEADER_TIMEOUT:
            sock.sendall(b"X-Slow: 1\r\n")
        answer = sock.recv(4096)
    except OSError:
        pass
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert time.perf_counter() - start < 3 * HEADER_TIMEOUT
    # a body that stops arriving: 408 after the body timeout
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.settimeout(3 * BODY_TIMEOUT)
    sock.sendall(b"PATCH /v1/tenants/acme HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + keys["acme"].encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    assert sock.recv(4096).startswith(b"HTTP/1.1 408")
    # connections that send nothing: beyond the cap the oldest silent ones are closed (503), so a
    # client that connects and sends is served at once (was: refused until the header timeout)
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(MAX_CONNECTIONS + 8)]
    time.sleep(0.3)
    refused = [i for i, s in enumerate(held)
               if select.select([s], [], [], 0)[0] and s.recv(64).startswith(b"HTTP/1.1 503")]
    # the oldest (one more when a connection of the checks above is still closing)
    assert refused == list(range(len(refused))) and 8 <= len(refused) <= 10, refused
    start = time.perf_counter()
    assert classify(server, "acme", keys["acme"], [png("RGB", 64, 64)]).status_code == 200
    assert time.perf_counter() - start < HEADER_TIMEOUT / 2
    for s in held:
        s.close()


def test_booleans_are_not_numbers_and_scores_are_never_null(server, keys, embedded_encoder):
    acme = auth(keys["acme"])
    for body in ({"theta": False}, {"theta": True}, {"theta": "0.5"}):
        r = httpx.patch(f"{server.url}/v1/tenants/acme", json=body, headers=acme)
        assert r.status_code == 422 and "theta" in r.json()["error"], r.text
    r = httpx.post(f"{server.url}/v1/tenants", json={"tenant": "b", "classes": ["x"], "theta": False},
                   headers=auth(ADMIN_KEY))
    assert r.status_code == 422
    r = httpx.post(f"{server.url}/v1/tenants/acme/rollback", json={"version": True}, headers=acme)
    assert r.status_code == 422 and "version" in r.json()["error"]
    assert classify(server, "acme", keys["acme"], [png("RGB", 64, 64)], theta="false").status_code == 422
    assert httpx.patch(f"{server.url}/v1/tenants/acme", json={"theta": 0}, headers=acme).status_code == 200
    httpx.patch(f"{server.url}/v1/tenants/acme", json={"theta": None}, headers=acme)
    # a prompt with huge finite values: refused at upload, or refused at classify, never `"score": null`
    r = httpx.post(f"{server.url}/v1/tenants", json={"tenant": "nulls", "classes": CLASSES}, headers=auth(ADMIN_KEY))
    nulls = r.json()["api_key"]
    ctx = init_context(embedded_encoder, phrase="a photo of a") * 0 + 1e20
    meta = PromptMeta(kind="local", tenant="client-0", encoder=embedded_encoder.fingerprint, n_ctx=ctx.shape[0],
                      width=ctx.shape[1], theta=1.0)
    up = httpx.post(f"{server.url}/v1/tenants/nulls/prompt", headers=auth(nulls),
                    files={"file": ("p.safetensors", artifact_bytes(ctx, meta), "application/octet-stream")})
    if up.status_code == 201:
        r = classify(server, "nulls", nulls, [png("RGB", 64, 64)])
        assert r.status_code == 409 and "non-finite" in r.json()["error"], r.text
        assert '"score"' not in r.text
    else:
        assert 400 <= up.status_code < 500, up.text
    assert "Traceback" not in server.log.read_text()


def burst(url: str, key: str | None, n: int, body_bytes: int) -> tuple[list[int], list[str]]:
    """`n` concurrent keep-alive clients (httpx defaults), each posting one image of `body_bytes`."""
    image = png("RGB", 64, 64) + b"\0" * max(0, body_bytes - 200)

    async def one(client: httpx.AsyncClient):
        try:
            r = await client.post(f"{url}/v1/tenants/acme/classify", headers=auth(key) if key else {},
                                  files=[("images", ("a.png", image, "image/png"))])
            return r.status_code
        except httpx.HTTPError as e:
            return f"{type(e).__name__}: {e}"

    async def run():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as client:
            return await asyncio.gather(*[one(client) for _ in range(n)])

    results = [r for _ in range(3) for r in asyncio.run(run())]
    return [r for r in results if isinstance(r, int)], [r for r in results if isinstance(r, str)]


def test_refusals_before_the_body_never_drop_the_connection(server, keys):
    # was: answering before reading the body, then closing, let the kernel reset the connection under
    # the answer ("server disconnected without sending a response", ~5% of a shed burst)
    statuses, errors = burst(server.url, None, 40, 64 << 10)
    assert not errors and set(statuses) == {401}, (errors[:3], set(statuses))
    # a body larger than what a refusal reads (256 KiB): the answer still arrives (seen on a GPU
    # host as httpx.ReadError for 32-image requests that were shed with 503)
    statuses, errors = burst(server.url, None, 8, 3 << 20)
    assert not errors and set(statuses) == {401}, (errors[:3], set(statuses))
    statuses, errors = burst(server.url, keys["acme"], 40, 2 << 10)
    assert not errors and set(statuses) <= {200, 503}, (errors[:3], set(statuses))


def answer_to_headers(server, head: bytes, body: bytes = b"") -> tuple[bytes, float]:
    """Send a request's head (and the start of a body), read the first answer; (its first bytes, seconds)."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(3 * BODY_TIMEOUT)
        start = time.perf_counter()
        sock.sendall(head + b"\r\n" + body)
        return sock.recv(4096), time.perf_counter() - start


def test_a_refusal_does_not_wait_for_a_body_it_will_not_read(server, keys):
    classify_head = (b"POST /v1/tenants/acme/classify HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: multipart/form-data; boundary=XX\r\n")
    key = b"Authorization: Bearer " + keys["acme"].encode() + b"\r\n"
    # declared over the limit, nothing sent: 413 at once (was: 408 after the body timeout, as the
    # refusal first tried to read 256 KiB of a body it would drop)
    answer, seconds = answer_to_headers(server, classify_head + key + b"Content-Length: 67108865\r\n")
    assert answer.startswith(b"HTTP/1.1 413") and b"connection: close" in answer.lower(), answer
    assert seconds < 0.5, seconds
    answer, seconds = answer_to_headers(server, classify_head + b"Content-Length: 5000000\r\n", b"--XX\r\n")
    assert answer.startswith(b"HTTP/1.1 401") and seconds < 0.5, (answer, seconds)
    # a client waiting for 100 Continue is told the refusal instead (was: 100 Continue, then 401)
    answer, seconds = answer_to_headers(server, classify_head + b"Expect: 100-continue\r\nContent-Length: 1000\r\n")
    assert answer.startswith(b"HTTP/1.1 401") and b"100 Continue" not in answer and seconds < 0.5, answer
    # a small declared body that never comes: answered after a second, not after the body timeout
    answer, seconds = answer_to_headers(server, b"PATCH /v1/tenants/acme HTTP/1.1\r\nHost: x\r\n"
                                                b"Content-Type: application/json\r\nContent-Length: 100\r\n")
    assert answer.startswith(b"HTTP/1.1 401") and seconds < BODY_TIMEOUT, (answer, seconds)
    # a small body that does come is read and dropped: the connection stays open for the next request
    with httpx.Client(base_url=server.url) as client:
        assert client.post("/v1/tenants/acme/classify", content=b"x" * 1000).status_code == 401
        assert client.get("/v1/info").status_code == 200


def test_a_client_gone_mid_body_or_malformed_http_costs_no_traceback(server, keys):
    head = (b"POST /v1/tenants/acme/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + keys["acme"].encode()
            + b"\r\nContent-Type: multipart/form-data; boundary=XX\r\n")
    logged = server.log.stat().st_size
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # leaves after a part of its body
        sock.sendall(head + b"Content-Length: 1000\r\n\r\n--XX\r\n")
        time.sleep(0.3)
    answer, _ = answer_to_headers(server, head + b"Transfer-Encoding: chunked\r\n", b"zz\r\n")  # no chunk size
    assert answer.startswith(b"HTTP/1.1 400") and b"application/json" in answer, answer
    assert b'{"error": "malformed HTTP request' in answer, answer  # was: text/plain from uvicorn
    assert classify(server, "acme", keys["acme"], [png("RGB", 64, 64)]).status_code == 200
    with open(server.log, "rb") as log:
        log.seek(logged)
        new = log.read().decode(errors="replace")
    # was: three ERROR tracebacks (~270 lines) for each, ClientDisconnect; any client could flood the log
    assert "Traceback" not in new and "ClientDisconnect" not in new, new[-3000:]


def test_a_burst_of_one_tenants_requests_is_served_not_all_shed(server, keys):
    """12 concurrent requests of one tenant, each two 1,500x1,500 PNGs (over a second of decoding
    together here): served in order until the deadline, the rest refused with Retry-After, before
    their decode. Was, with turns between a tenant's requests: every one decoded, every one late,
    all 12 refused (seen with 4000x4000 PNGs: 12 of 12 refused after 2.4-6.8 s)."""
    images = [png("RGB", 1500, 1500, (i * 20, 90, 160)) for i in range(2)]

    async def one(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(f"{server.url}/v1/tenants/globex/classify", headers=auth(keys["globex"]),
                                 files=[("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)])

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*[one(client) for _ in range(12)])

    time.sleep(11)  # the gate forgets the waits of the tests before (RECENT_S)
    answers = asyncio.run(burst())
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 2, statuses
    assert all(r.headers.get("retry-after") for r in answers if r.status_code == 503)
    assert max(r.elapsed.total_seconds() for r in answers) < 4 * DEADLINE + 1, [r.elapsed for r in answers]


def test_a_slow_upload_is_not_counted_as_waiting(server, keys):
    """A body that takes longer than the deadline to arrive (a slow link) is the client's own time,
    not a wait in the server's queue: answered 200 (was: refused 503 as late once it arrived)."""
    content_type, body = overload.multipart([png("RGB", 64, 64, (10, 200, 10))])
    head = (f"POST /v1/tenants/acme/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {keys['acme']}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    pieces = 6
    step = -(-len(body) // pieces)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(3 * BODY_TIMEOUT)
        sock.sendall(head)
        for i in range(pieces):  # 1.2 s to upload, over twice the 0.5 s deadline
            time.sleep(0.2)
            sock.sendall(body[i * step:(i + 1) * step])
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
