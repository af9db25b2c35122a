"""The front door: every proxy client connects here first.

Most of an app's traffic is CONNECT tunnels to hosts that are not Salesforce token hosts. Those are
never decrypted, so there is nothing for mitmproxy to do with them, and relaying their bytes through
its protocol layers costs CPU per chunk and memory per connection. The front door peeks at the first
request head without consuming it: a CONNECT to a host name that is not a token host is answered and
relayed right here with a plain copy loop; a CONNECT to a token host name is answered and served by
the token lane (:mod:`sidecar.tokenlane`); everything else (IP literals whose SNI only mitmproxy can
see, plain HTTP, a request without valid proxy credentials when they are required,
``SIDECAR_ROUTE=all``) is handed, socket and all, to mitmproxy's connection handler, as if mitmproxy
had accepted it itself.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fcntl
import hmac
import ipaddress
import logging
import socket
import struct
import termios
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING

from addons.client_access import ClientAccess, is_loopback
from sidecar.hosts import TokenHosts
from sidecar.logs import event
from sidecar.metrics import Metrics
from sidecar.upstream import MAX_HEAD_BYTES, describe_error

if TYPE_CHECKING:
    from sidecar.tokenlane import TokenLane

log = logging.getLogger("egress_sidecar.frontdoor")

MAX_HEAD = MAX_HEAD_BYTES
HEAD_TIMEOUT = 30.0
RELAY_CHUNK = 64 * 1024  # per read; a stalled tunnel holds at most one chunk

Handoff = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _head_length(head: bytes) -> int:
    ends = [i + len(sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := head.find(sep)) >= 0]
    return min(ends)


def parse_connect(head: bytes) -> tuple[str, int] | None:
    """``(host, port)`` of a ``CONNECT host:port HTTP/1.x`` head, else None."""
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] != b"CONNECT" or not parts[2].startswith(b"HTTP/1."):
        return None
    authority = parts[1].decode("ascii", errors="replace")
    host, sep, port_s = authority.rpartition(":")
    if not sep or not port_s.isdigit() or not host or not 0 < int(port_s) < 65536:
        return None
    return host.strip("[]").lower(), int(port_s)


def _authorized(head: bytes, expected: bytes) -> bool:
    """Whether a request head carries ``Proxy-Authorization: Basic base64(expected)``."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() != b"proxy-authorization":
            continue
        scheme, _, credential = value.strip().partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            given = base64.b64decode(credential.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(given, expected)
    return False


def _is_ip(host: str) -> bool:
    """An IP literal, including the shorthand forms resolvers accept (127.1, 2130706433, 0x7f.1):
    for those only the TLS SNI can tell whether it is a token call, and only mitmproxy looks at it."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        last = host.rstrip(".").rsplit(".", 1)[-1]
        return not any(c.isalpha() for c in last) or last.lower().startswith("0x")
    return True


class FrontDoor:
    def __init__(
        self,
        hosts: TokenHosts,
        metrics: Metrics,
        access: ClientAccess,
        *,
        relay_here: bool,
        connect_timeout: float,
        idle_timeout: float,
        handoff: Handoff,
        lane: TokenLane | None = None,
        proxy_auth: str | None = None,
    ) -> None:
        self.hosts = hosts
        self.metrics = metrics
        self.access = access
        self.relay_here = relay_here  # False with SIDECAR_ROUTE=all: mitmproxy does it all
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.handoff = handoff
        self.lane = lane  # serves CONNECTs to token host names; without it mitmproxy does
        # SIDECAR_PROXY_AUTH ("user:pass"): a CONNECT carrying these credentials is served here; any
        # other request goes to mitmproxy, whose proxyauth answers 407 (or checks a plain request).
        self.proxy_auth = proxy_auth.encode() if proxy_auth is not None else None
        self._tasks: set[asyncio.Task[None]] = set()
        self._listener: socket.socket
        self._accept_task: asyncio.Task[None]

    async def start(self, host: str, port: int) -> tuple[str, int]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto given explicitly: asyncio only switches Nagle off on sockets whose proto is TCP, and a
        # token call on a Nagle-delayed socket waits ~40 ms for a delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
        self._listener = sock
        self._accept_task = asyncio.create_task(self._accept_loop(sock), name="front-door")
        addr = sock.getsockname()
        return str(addr[0]), int(addr[1])

    def close_listener(self) -> None:
        """Accept no new clients; the ones connected are served on."""
        self._accept_task.cancel()
        self._listener.close()

    async def stop(self) -> None:
        self.close_listener()
        for task in [self._accept_task, *self._tasks]:
            task.cancel()
        await asyncio.gather(self._accept_task, *self._tasks, return_exceptions=True)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:  # e.g. EMFILE: back off instead of spinning
                event(log, logging.ERROR, f"front door cannot accept: {describe_error(exc)}")
                await asyncio.sleep(0.1)
                continue
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(self._accepted(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _accepted(self, sock: socket.socket) -> None:
        handed_off = False  # once a transport owns the socket, it closes it
        if self.proxy_auth is None and not is_loopback(str(sock.getpeername()[0])):
            # Without SIDECAR_PROXY_AUTH only loopback clients are served: refuse before holding a slot.
            self.access.refuse(str(sock.getpeername()[0]))
            sock.close()
            return
        self.access.active += 1  # every client connection counts, from accept to close
        try:
            head = await self._peek_head(sock) if self.relay_here else b""
            target = parse_connect(head)
            if target is not None and self.proxy_auth is not None and not _authorized(head, self.proxy_auth):
                target = None  # mitmproxy asks for the credentials
            if target is None or _is_ip(target[0]) or (self.lane is None and self.hosts.matches(target[0])):
                handed_off = True
                reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_HEAD)
                await self.handoff(reader, writer)  # mitmproxy takes it from the first byte
            else:
                await self._serve(sock, _head_length(head), target)
        except (OSError, TimeoutError):
            pass
        except Exception as exc:  # noqa: BLE001 - one bad client must not affect the others
            event(log, logging.ERROR, f"front door: {type(exc).__name__} on a client connection")
            log.debug("front door: unexpected error", exc_info=True)
        finally:
            self.access.active -= 1
            if not handed_off:
                sock.close()

    async def _serve(self, sock: socket.socket, head_length: int, target: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        await _recv_exactly(loop, sock, head_length)  # the CONNECT head; what follows is the tunnel's
        if self.access.active > self.access.max_connections:
            await _answer(loop, sock, 503, b"application/json", self.access.over_capacity_body())
            return
        if self.lane is not None and self.hosts.matches(target[0]):
            await loop.sock_sendall(sock, b"HTTP/1.1 200 Connection established\r\n\r\n")
            await self.lane.serve(sock, *target)
            return
        await self._relay(loop, sock, target)

    async def _peek_head(self, sock: socket.socket) -> bytes:
        """Wait for the first head and look at it with MSG_PEEK: nothing is consumed, so whoever serves
        the connection (here or mitmproxy) reads it from its first byte. Returns b"" for anything that
        is not a CONNECT head."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(min(HEAD_TIMEOUT, self.idle_timeout)):
            for attempt in range(200):  # bounded; a head normally arrives in one segment
                await _ready(loop, sock)
                seen = sock.recv(MAX_HEAD, socket.MSG_PEEK)
                if not (seen.startswith(b"CONNECT ") or (seen and b"CONNECT ".startswith(seen))):
                    return b""  # not a CONNECT: no need to wait for the whole head
                if b"\r\n\r\n" in seen or b"\n\n" in seen:
                    return seen
                if len(seen) >= MAX_HEAD:
                    return b""
                await asyncio.sleep(min(0.001 * (attempt + 1), 0.05))  # partial head: unread data stays readable
        return b""

    async def _relay(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, target: tuple[str, int]) -> None:
        try:
            async with asyncio.timeout(self.connect_timeout):
                upstream = await _connect(loop, target)
        except (OSError, TimeoutError) as exc:
            body = f"egress-sidecar: cannot connect to {target[0]}:{target[1]}: {describe_error(exc)}".encode()
            await _answer(loop, sock, 502, b"text/plain", body)
            return
        self.metrics.tunnels.labels("direct").inc()
        try:
            await loop.sock_sendall(sock, b"HTTP/1.1 200 Connection established\r\n\r\n")
            await _pipe_both(loop, sock, upstream, self.idle_timeout)
        finally:
            upstream.close()


async def _ready(loop: asyncio.AbstractEventLoop, sock: socket.socket, *, write: bool = False) -> None:
    """Wait until the socket is readable (or writable), without reading or writing anything."""
    add, remove = (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    ready: asyncio.Future[None] = loop.create_future()
    add(sock.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        remove(sock.fileno())


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = await loop.sock_recv(sock, n - len(out))
        if not chunk:
            raise ConnectionError("client closed during the CONNECT head")
        out += chunk
    return bytes(out)


def closing_response(status: int, content_type: bytes, body: bytes) -> bytes:
    """A complete answer of the sidecar's own after which the connection closes (503s say when to retry)."""
    retry = b"Retry-After: 1\r\n" if status == 503 else b""
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%sContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (status, HTTPStatus(status).phrase.encode(), content_type, retry, len(body))) + body


async def _answer(loop: asyncio.AbstractEventLoop, sock: socket.socket, status: int, ctype: bytes,
                  body: bytes) -> None:
    with contextlib.suppress(OSError):
        await loop.sock_sendall(sock, closing_response(status, ctype, body))


async def _connect(loop: asyncio.AbstractEventLoop, target: tuple[str, int]) -> socket.socket:
    infos = await loop.getaddrinfo(target[0], target[1], type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    error: OSError = OSError(f"{target[0]} has no address")
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, addr)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise error


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux


def quickack(sock: socket.socket) -> None:
    """Acknowledge what arrives at once instead of after the kernel's delayed-ACK timer (~40 ms).

    A client that sends a request in two writes (head, then body) with Nagle's algorithm on holds the
    second write until the first is acknowledged; with a delayed ACK on this side every such request
    waits ~40 ms. Python ``requests`` is such a client: through a proxy its tunnel socket keeps Nagle
    on (measured: 44 ms per token call through the sidecar, 2.3 ms with this). Linux resets quick-ACK
    mode on its own, so it is set before every read.
    """
    if _QUICKACK is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)


def _unsent(sock: socket.socket) -> int:
    """Bytes still queued in the kernel for the peer (Linux SIOCOUTQ); 0 where that is unknown."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def _abort(sock: socket.socket) -> None:
    """Close with a reset, so the peer sees an error and not a clean (truncating) end of stream."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def _pipe_both(loop: asyncio.AbstractEventLoop, a: socket.socket, b: socket.socket, idle_timeout: float) -> None:
    """Copy both ways until both sides are done (half-closes are passed on, resets too) or nothing
    moved for ``idle_timeout`` seconds; an idle tunnel is cut with a reset. Progress of a send to a
    slow reader counts as activity, so a slow but steady download is never cut."""
    last = [loop.time()]
    reset = [False]

    async def pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                # A fresh chunk per read, sized to what arrived: an idle tunnel holds no buffer.
                quickack(src)
                data = await loop.sock_recv(src, RELAY_CHUNK)
                if not data:
                    break
                last[0] = loop.time()
                view = memoryview(data)
                while view:
                    try:
                        sent = dst.send(view)
                    except (BlockingIOError, InterruptedError):
                        await _ready(loop, dst, write=True)
                        continue
                    view = view[sent:]
                    last[0] = loop.time()
        except ConnectionResetError:
            reset[0] = True
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    tasks = [asyncio.create_task(pipe(a, b)), asyncio.create_task(pipe(b, a))]
    seen_queued = [(0, 0)]
    idle = False
    try:
        while True:
            done, _ = await asyncio.wait(tasks, timeout=min(idle_timeout, 30.0), return_when=asyncio.ALL_COMPLETED)
            if len(done) == 2 or reset[0]:
                break
            if loop.time() - last[0] > idle_timeout:
                # Bytes queued in the kernel for a slow reader drain without any call of ours: a
                # queue that shrank since the last look is progress, not idleness.
                queued = (_unsent(a), _unsent(b))
                if queued != seen_queued[0]:
                    seen_queued[0] = queued
                    last[0] = loop.time()
                    continue
                idle = True
                break
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if idle or reset[0]:
            _abort(a)
            _abort(b)
