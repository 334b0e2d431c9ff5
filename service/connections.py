"""Slow clients: header and body read timeouts and a cap on open connections, at the HTTP protocol.

BentoML 1.4 passes only `backlog`, `timeout_keep_alive` and `timeout_graceful_shutdown` through
to uvicorn, and uvicorn itself has no header or body read timeout: a client that trickles its
headers is never closed (its first byte cancels the keep-alive timer), and nothing bounds how
many such connections are held. An ASGI app cannot help, since it sees a request only once its
headers are complete. So the worker swaps uvicorn's "auto" HTTP protocol (httptools) for this
subclass, which adds the three limits and takes its keep-alive from ServiceConfig.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import time

from service.config import ServiceConfig

log = logging.getLogger("promptfolio.service")
ARRIVED = "promptfolio.arrived"  # scope["state"] key: time.monotonic() when the request's bytes arrived
# (not loop.time(): uvloop's is libuv's loop time, read once per loop iteration and in whole ms, so
# a duration measured with it is short by however long the iteration had already run)
_settings = ServiceConfig()  # replaced by `configure` when the service starts


def configure(cfg: ServiceConfig) -> None:
    global _settings
    _settings = cfg


def _kernel_idle_s(transport: asyncio.Transport) -> float | None:
    """Seconds since the kernel last received data on this connection (Linux TCP_INFO
    tcpi_last_data_recv), i.e. how long a request's bytes have waited, the accept queue included."""
    sock = transport.get_extra_info("socket")
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        return struct.unpack_from("I", info, 52)[0] / 1000
    except (OSError, AttributeError, struct.error, TypeError):
        return None


LINGER_S = 1.0  # how long a refused connection is still read (and discarded) after its answer


def _reply_and_close(transport: asyncio.Transport, status: int, reason: str, message: str) -> None:
    """Answer, then half-close: closing a socket with unread request bytes makes the kernel send a
    reset, which can destroy the answer before the client reads it. So stop writing, keep reading
    (the protocol discards what arrives) for LINGER_S, then close."""
    body = json.dumps({"error": message}).encode()
    retry = "retry-after: 1\r\n" if status == 503 else ""
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{retry}connection: close\r\n\r\n").encode()
    if transport.is_closing():
        return
    transport.write(head + body)
    _linger_close(transport)


def _linger_close(transport: asyncio.Transport) -> None:
    """Stop writing, let the caller discard what still arrives, close after LINGER_S."""
    if transport.can_write_eof():
        transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_S, transport.close)
    else:
        transport.close()


class _CloseAfterTheBody:
    """The transport as one request's cycle sees it. uvicorn closes the connection right after an
    answer sent with `connection: close`; when the app answered without reading the whole body (a
    refusal: 401, 413, 503), the client is usually still sending, and the kernel would reset the
    connection under the answer (httpx: ReadError, not the 503). So such a close lingers: the rest
    of the body is read and discarded for LINGER_S, bounded in time, never buffered."""

    def __init__(self, protocol, transport: asyncio.Transport) -> None:
        self._protocol, self._transport = protocol, transport

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def close(self) -> None:
        cycle = self._protocol.cycle
        if cycle is not None and cycle.more_body and not self._transport.is_closing():
            self._protocol._refused = True  # data_received discards from now on
            self._protocol.flow.resume_reading()  # reading may have been paused at the high-water mark
            _linger_close(self._transport)
        else:
            self._transport.close()


def install() -> bool:
    """Make uvicorn's 'auto' protocol the guarded one (call before the server starts; False if unsupported)."""
    try:
        from uvicorn.protocols.http import auto
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # no httptools: uvicorn falls back to h11, which this does not extend
        log.warning("httptools is not installed: no header/body read timeouts or connection cap")
        return False

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        """httptools protocol + header timeout, body timeout, connection cap (idle ones closed first)."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.cfg = _settings
            self.timeout_keep_alive = self.cfg.keep_alive_s
            self._read_timer: asyncio.TimerHandle | None = None
            self._refused = False  # answered by the protocol itself: what still arrives is discarded
            self._silent = True  # no byte received yet
            self._opened = time.monotonic()

        def _arm(self, seconds: float, what: str) -> None:
            self._disarm()
            self._read_timer = self.loop.call_later(seconds, self._read_timed_out, what)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _refuse(self, status: int, reason: str, message: str) -> None:
            self._disarm()
            self._refused = True
            if self.cycle is not None:
                self.cycle.disconnected = True  # the app, if it still runs, must not write after this answer
            _reply_and_close(self.transport, status, reason, message)

        def send_400_response(self, msg: str) -> None:
            """What the HTTP parser refuses (a bad chunk size, Content-Length beside chunked, ...):
            answered in the API's JSON error shape (uvicorn's is text/plain), with the lingering close."""
            self._refuse(400, "Bad Request", "malformed HTTP request: the HTTP parser refused it")

        def data_received(self, data: bytes) -> None:
            self._silent = False
            if not self._refused:
                super().data_received(data)

        def _read_timed_out(self, what: str) -> None:
            self._read_timer = None
            if self.cycle is not None and not self.cycle.response_complete and self.cycle.response_started:
                self.transport.close()  # the app is answering; the client stopped reading or sending
                return
            self._refuse(408, "Request Timeout", f"the request {what} did not arrive in time")

        def _idle(self) -> bool:
            return self._read_timer is None and (self.cycle is None or self.cycle.response_complete)

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > self.cfg.max_connections:
                self._make_room()
            if len(self.connections) > self.cfg.max_connections:
                self._refuse(503, "Service Unavailable", "too many open connections")
                return
            self._arm(self.cfg.header_timeout_s, "headers")  # also bounds a connection that sends nothing

        def _make_room(self) -> None:
            """Over the cap: close idle keep-alive connections, then connections that have sent
            nothing yet, oldest first. A client that connects and sends is never the oldest silent
            one, so one holding many silent sockets loses its own instead of locking others out
            until the header timeout (1,024 silent sockets did that for 10 s at a time)."""
            others = [c for c in self.connections if c is not self and hasattr(c, "_silent")]
            idle = [c for c in others if c._idle()]
            silent = sorted((c for c in others if c._silent and not c._idle()), key=lambda c: c._opened)
            for other in idle + silent:
                if len(self.connections) <= self.cfg.max_connections:
                    break
                if other._silent and not other._idle():
                    other._refuse(503, "Service Unavailable", "too many open connections")
                else:
                    other.transport.close()
                self.connections.discard(other)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm(self.cfg.header_timeout_s, "headers")

        def on_headers_complete(self) -> None:
            idle = _kernel_idle_s(self.transport)  # the admission gate counts the wait before the app
            if idle is not None:
                self.scope["state"][ARRIVED] = time.monotonic() - idle
            super().on_headers_complete()
            if self.cycle is not None:
                self.cycle.transport = _CloseAfterTheBody(self, self.transport)
            self._arm(self.cfg.body_timeout_s, "body")

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def on_response_complete(self) -> None:
            self._disarm()
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    auto.AutoHTTPProtocol = GuardedHttpToolsProtocol
    return True
