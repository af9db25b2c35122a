"""Shared base for the simulated services: one asyncio loop per server, in a daemon thread.

Why: the fakes are driven from synchronous pytest code and from the single-process demo, so each
server must start and stop from any thread, report bind errors to the caller, restart on the same
port for chaos tests, and never leave threads or sockets behind. The module also holds a minimal
HTTP/1.1 reader/writer: the fakes must parse what real clients send (keep-alive, Content-Length
and chunked bodies) without pulling a web framework into the package. Every read has a deadline.
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

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in (self.header("connection") or "").split(",")}
        return "keep-alive" in tokens if self.version == "HTTP/1.0" else "close" not in tokens


async def read_request(
    reader: asyncio.StreamReader, timeout: float = READ_TIMEOUT, *, read_body: bool = True
) -> HttpRequest | None:
    """Read one request. None on clean EOF or idle timeout; BadRequest on malformed input."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except asyncio.IncompleteReadError as e:
        if e.partial.strip():
            raise BadRequest(400, "incomplete request head") from None
        return None
    except asyncio.LimitOverrunError:
        raise BadRequest(431, "request head too large") from None
    except (TimeoutError, ConnectionError):
        return None
    lines = head.lstrip(b"\r\n").decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest(400, "malformed request line")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(400, "malformed header line")
        headers.append((name, value.strip()))
    req = HttpRequest(parts[0].upper(), parts[1], parts[2], headers)
    if read_body and req.method != "CONNECT":
        try:
            async with asyncio.timeout(timeout):
                req.body = await _read_body(reader, req)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            raise BadRequest(400, "bad or incomplete request body") from None
    return req


async def _read_body(reader: asyncio.StreamReader, req: HttpRequest) -> bytes:
    te = (req.header("transfer-encoding") or "").strip().lower()
    if te:
        if te.split(",")[-1].strip() != "chunked":
            raise BadRequest(501, "unsupported transfer-encoding")
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                break
            if len(body) + size > MAX_BODY:
                raise BadRequest(413, "body too large")
            chunk = await reader.readexactly(size + 2)
            if chunk[-2:] != b"\r\n":
                raise ValueError("chunk not terminated by CRLF")
            body += chunk[:-2]
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, bounded by the deadline
            pass
        return bytes(body)
    length = req.header("content-length")
    if length is None:
        return b""
    if not length.strip().isdigit():
        raise BadRequest(400, "bad content-length")
    if int(length) > MAX_BODY:
        raise BadRequest(413, "body too large")
    return await reader.readexactly(int(length))


def render_response(
    status: int,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    *,
    keep_alive: bool = True,
) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    merged = {"Date": formatdate(usegmt=True), **(headers or {}), "Content-Length": str(len(body))}
    merged["Connection"] = "keep-alive" if keep_alive else "close"
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in merged.items())
    return (head + "\r\n").encode("latin-1") + body


def peer_ip(writer: asyncio.StreamWriter) -> str:
    return str(writer.get_extra_info("peername")[0])


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
                await send(writer, render_response(e.status, str(e).encode(), {"Content-Type": "text/plain"}, keep_alive=False))
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
