"""Shared base for the simulated services: one asyncio loop per server, in a daemon thread.

Why: the fakes are driven from synchronous pytest code and from the single-process demo, so each
server must start and stop from any thread, report bind errors to the caller, restart on the same
port for chaos tests, and never leave threads or sockets behind. HTTP/1.1 is framed by h11, as in
the sidecar itself (keep-alive, Content-Length and chunked bodies, CONNECT). Every read has a deadline.

Why not the sidecar's codec (``sidecar.net.http1``): the fakes stand for Salesforce and QuotaGuard, the
world the sidecar is tested against. Built on the code under test, a bug in the codec would be on both
ends of every exchange and agree with itself; framed here on h11 directly, with their own streams
(asyncio's), they stay an independent witness, as a real server would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Self

import h11

log = logging.getLogger("sidecar.sim")

READ_TIMEOUT = 30.0  # idle keep-alive and per-request deadline
MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
STOP_TIMEOUT = 5.0


class BadRequest(Exception):
    """The peer sent something that is not acceptable HTTP/1.1; answer `status` and close."""

    def __init__(self, status: int = 400, message: str = "bad request") -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class HttpRequest:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]  # in arrival order, original case
    body: bytes = b""

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None

    @property
    def header_map(self) -> dict[str, str]:
        """Lowercase names; repeated headers joined with ', '."""
        out: dict[str, str] = {}
        for k, v in self.headers:
            k = k.lower()
            out[k] = f"{out[k]}, {v}" if k in out else v
        return out


class HttpServerConnection:
    """One client connection of a fake, framed by h11 (keep-alive, Content-Length and chunked bodies,
    CONNECT), over asyncio streams. Every read has a deadline."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float = READ_TIMEOUT) -> None:
        self.reader, self.writer, self.timeout = reader, writer, timeout
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._method = b"GET"

    async def _event(self) -> h11.Event:
        for _ in range(MAX_BODY):  # bounded: every read brings at least one byte
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise BadRequest(exc.error_status_hint, str(exc) or "bad request") from None
            if event is not h11.NEED_DATA:
                return event
            self.h11.receive_data(await asyncio.wait_for(self.reader.read(65536), self.timeout))
        raise BadRequest(413, "body too large")

    async def read_request(self) -> HttpRequest | None:
        """The next request, its body read. None on a clean end or idle timeout; BadRequest on
        malformed input."""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        try:
            event = await self._event()
        except (TimeoutError, ConnectionError):
            return None
        if not isinstance(event, h11.Request):
            return None
        self._method = event.method
        req = HttpRequest(event.method.decode("ascii"), event.target.decode("latin-1"),
                          "HTTP/" + event.http_version.decode("ascii"),
                          [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers.raw_items()])
        body = bytearray()
        try:
            async with asyncio.timeout(self.timeout):
                while isinstance(part := await self._event(), h11.Data):
                    body += part.data
                    if len(body) > MAX_BODY:
                        raise BadRequest(413, "body too large")
        except (TimeoutError, ConnectionError):
            raise BadRequest(400, "incomplete request body") from None
        req.body = bytes(body)
        return req

    @property
    def keep_alive(self) -> bool:
        return self.h11.our_state is not h11.MUST_CLOSE and self.h11.their_state is not h11.MUST_CLOSE

    async def respond(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None,
                      *, keep_alive: bool = True) -> None:
        """A whole response; the connection then closes unless it stays alive on both sides."""
        tunnel = self._method == b"CONNECT" and 200 <= status < 300  # the connection becomes the tunnel
        merged = {"Date": formatdate(usegmt=True), **(headers or {})}
        if not tunnel:
            merged["Content-Length"] = str(len(body))
        if not keep_alive:
            merged["Connection"] = "close"
        data = self.h11.send(h11.Response(status_code=status, reason=_reason(status), headers=list(merged.items())))
        if not tunnel:
            if self._method != b"HEAD" and body:
                data = (data or b"") + (self.h11.send(h11.Data(data=body)) or b"")
            data = (data or b"") + (self.h11.send(h11.EndOfMessage()) or b"")
        await send(self.writer, data or b"")

    @property
    def leftover(self) -> bytes:
        """Bytes the client sent past what was read (after a CONNECT: the start of the tunnel)."""
        return self.h11.trailing_data[0]


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def render_response(status: int, body: bytes = b"", headers: Mapping[str, str] | None = None) -> bytes:
    """A whole closing response on a connection no HttpServerConnection serves (errors, fault modes)."""
    conn = h11.Connection(h11.SERVER)
    merged = [*(headers or {}).items(), ("Content-Length", str(len(body))), ("Connection", "close")]
    return b"".join(conn.send(e) or b"" for e in (
        h11.Response(status_code=status, reason=_reason(status), headers=merged), h11.Data(data=body),
        h11.EndOfMessage()))


@dataclass
class _Tracked:
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    transports: set[asyncio.WriteTransport] = field(default_factory=set)


class ThreadedServer:
    """A TCP (optionally TLS) server on its own event loop in a daemon thread.

    Subclasses implement `handle(reader, writer)`; the base closes the connection afterwards.
    """

    read_timeout: float = READ_TIMEOUT

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"simulated services bind to loopback only, not {host}")
        self.host = host
        self._port = port
        self._ssl = ssl_context
        self._lock = threading.Lock()  # guards counters/records shared with the caller's thread
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._tracked = _Tracked()
        self._error: BaseException | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> Self:
        """Bind and listen; returns once listening. Bind errors are raised here."""
        if self._thread is not None:
            raise RuntimeError(f"{self!r} already running")
        ready = threading.Event()
        self._error = None
        thread = threading.Thread(target=self._run, args=(ready,), daemon=True, name=f"sim-{type(self).__name__}")
        thread.start()
        if not ready.wait(STOP_TIMEOUT):
            raise RuntimeError(f"{self!r} did not start listening in {STOP_TIMEOUT}s")
        if self._error is not None:
            thread.join(STOP_TIMEOUT)
            raise self._error
        self._thread = thread
        return self

    def stop(self) -> None:
        """Close the listener and every open connection; join the thread (bounded)."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:  # loop already closed
            pass
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError(f"{self!r} thread did not stop within {STOP_TIMEOUT}s")
        self._thread = None

    def restart(self) -> Self:
        """Stop, then listen again on the same port (SO_REUSEADDR)."""
        self.stop()
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        if self._port == 0:
            raise RuntimeError(f"{type(self).__name__} not started: port unknown")
        return self.host, self._port

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._tracked.tasks)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host}:{self._port} running={self.running}>"

    # ---- loop thread -----------------------------------------------------------------------
    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(
                    self._on_client, self.host, self._port, ssl=self._ssl,
                    reuse_address=True, ssl_handshake_timeout=10 if self._ssl else None, limit=MAX_HEAD,
                )
            )
            self._port = self._server.sockets[0].getsockname()[1]
        except BaseException as e:  # noqa: BLE001 - surfaced to start()'s caller
            self._error = e
            loop.close()
            ready.set()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(self._shutdown())
            finally:
                loop.close()
                self._server = None

    async def _shutdown(self) -> None:
        server = self._server
        assert server is not None
        server.close()
        if hasattr(server, "abort_clients"):  # 3.13+: also connections still in the TLS handshake
            server.abort_clients()
        with self._lock:
            transports, tasks = list(self._tracked.transports), list(self._tracked.tasks)
        for transport in transports:
            transport.abort()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        try:
            await asyncio.wait_for(server.wait_closed(), 2)
        except TimeoutError:
            log.warning("%r: wait_closed timed out", self)
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
        await asyncio.get_running_loop().shutdown_asyncgens()

    def track(self, writer: asyncio.StreamWriter) -> None:
        """Register an extra connection (e.g. upstream) so stop() aborts it too."""
        with self._lock:
            self._tracked.transports.add(writer.transport)

    def untrack(self, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self._tracked.transports.discard(writer.transport)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        with self._lock:
            self._tracked.tasks.add(task)
        self.track(writer)
        try:
            await self.handle(reader, writer)
        except BadRequest as e:
            with contextlib.suppress(ConnectionError, TimeoutError, ssl.SSLError):
                await send(writer, render_response(e.status, str(e).encode(), {"Content-Type": "text/plain"}))
        except (ConnectionError, TimeoutError, ssl.SSLError):
            pass
        except Exception:
            log.exception("%r: handler failed", self)
        finally:
            await close_writer(writer)
            self.untrack(writer)
            with self._lock:
                self._tracked.tasks.discard(task)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


async def send(writer: asyncio.StreamWriter, data: bytes, timeout: float = READ_TIMEOUT) -> None:
    writer.write(data)
    await asyncio.wait_for(writer.drain(), timeout)


async def close_writer(writer: asyncio.StreamWriter, timeout: float = 2.0) -> None:
    """Close gracefully (flush, TLS close_notify) but never wait longer than `timeout`."""
    try:
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), timeout)
    except (TimeoutError, ConnectionError, ssl.SSLError, OSError):
        writer.transport.abort()
