"""The front door: every proxy client connects here first, on ``SIDECAR_LISTEN``.

It reads the client's first request head with h11, within a deadline (a head trickled byte by byte
is cut with ``408``, so no engine ever holds a connection for a head that never completes), checks
the client (loopback or proxy credentials, the connection cap), then gives the connection to the
engine that serves it:

- a ``CONNECT`` to a token host *name*: answered here and served by the token lane
  (:mod:`sidecar.proxy.lane`);
- a ``CONNECT`` to any other host name: answered and relayed here as raw bytes (:mod:`sidecar.proxy.relay`),
  direct, or through a pair member with ``SIDECAR_ROUTE=all``;
- a ``CONNECT`` to an IP literal: answered, then the SNI of the client's TLS ClientHello decides: a
  token host's goes to the lane, anything else is relayed;
- a plain proxy request (``GET http://...``): a token call is served by the lane (refused over
  ``http://``); anything else is handed to mitmproxy, socket and bytes read so far, as if mitmproxy had
  accepted it itself. mitmproxy closes each such connection after one answer, so every request head
  on it comes through here (capped and timed) first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable

import h11

from sidecar.config import Upstream
from sidecar.egress.pair import Member
from sidecar.logs import Throttle, event
from sidecar.metrics import Metrics
from sidecar.net.http1 import (
    MAX_HEAD,
    HttpConnection,
    ProtocolError,
    absolute_target,
    closing_events,
    error_events,
    parse_authority,
)
from sidecar.net.streams import CHUNK, SocketStream, linger
from sidecar.net.upstream import ConnectFailure, describe_error
from sidecar.proxy.access import Access
from sidecar.proxy.destinations import DestinationRefused, Destinations, is_ip
from sidecar.proxy.lane import Lane
from sidecar.proxy.relay import (
    UnfinishedHello,
    client_hello_sni,
    open_target,
    pipe_both,
)
from sidecar.token.call import is_token_request
from sidecar.token.hosts import TokenHosts
from sidecar.token.messages import origin_path

log = logging.getLogger("egress_sidecar.frontdoor")

HEAD_TIMEOUT = 30.0  # at most this long (and at most SIDECAR_IDLE_TIMEOUT) for a client's first head
REFUSAL_LOG_EVERY = 10.0  # seconds: at most one log line this often for clients refused at the cap
Handoff = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
_ESTABLISHED = h11.Response(status_code=200, reason=b"Connection established", headers=[])


class _Recording(SocketStream):
    """A client stream that keeps what it read, so mitmproxy can be handed the bytes from the first."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.seen = bytearray()

    async def recv(self, n: int = CHUNK) -> bytes:
        data = await super().recv(n)
        self.seen += data
        return data


async def _connect_without_host(seen: bytes, sock: socket.socket) -> tuple[HttpConnection, h11.Event] | None:
    """A ``CONNECT`` without the ``Host`` header HTTP/1.1 asks for (h11 refuses it; Squid, mitmproxy
    and most proxies accept it, and some clients rely on that), read again as if its target were
    its Host. None for anything else."""
    end = seen.find(b"\n")
    if not seen.startswith(b"CONNECT ") or end < 0:
        return None
    target = seen[len(b"CONNECT "):end].partition(b" ")[0]
    client = HttpConnection(SocketStream(sock, seen[:end + 1] + b"Host: " + target + b"\r\n" + seen[end + 1:]),
                            h11.SERVER)
    try:
        return client, await client.next_event()
    except ProtocolError:
        return None


class FrontDoor:
    def __init__(self, hosts: TokenHosts, metrics: Metrics, access: Access, *, connect_timeout: float,
                 idle_timeout: float, handoff: Handoff, lane: Lane, upstream: Upstream | None,
                 tunnel_member: Callable[[], Member | None], destinations: Destinations) -> None:
        self.destinations = destinations
        self.hosts = hosts
        self.metrics = metrics
        self.access = access
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.head_timeout = min(HEAD_TIMEOUT, idle_timeout)
        self.handoff = handoff  # mitmproxy's connection handler
        self.lane = lane
        self.upstream = upstream
        self.tunnel_member = tunnel_member  # route of a relayed tunnel: None = direct
        self._tasks: set[asyncio.Task[None]] = set()
        self._cap_log = Throttle(REFUSAL_LOG_EVERY, self._log_cap_refusals)
        metrics.client_connections.set_function(lambda: access.active)
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
        self._cap_log.close()
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
        try:
            client_ip = str(sock.getpeername()[0])
        except OSError:
            sock.close()
            return
        if not self.access.admits(client_ip):  # refused before it holds a slot
            self.metrics.connections_refused.labels("not_loopback").inc()
            sock.close()
            return
        self.access.active += 1  # every client connection counts, from accept to close
        handed_off = False  # once mitmproxy's transport owns the socket, it closes it
        try:
            handed_off = await self._serve(sock)
        except (OSError, TimeoutError):
            pass
        except Exception as exc:  # noqa: BLE001 - one bad client must not affect the others
            event(log, logging.ERROR, f"front door: {type(exc).__name__} on a client connection")
            log.debug("front door: unexpected error", exc_info=True)
        finally:
            self.access.active -= 1
            if not handed_off:
                sock.close()

    async def _serve(self, sock: socket.socket) -> bool:
        """Serve one client connection; True when it was handed to mitmproxy."""
        stream = _Recording(sock)
        client = HttpConnection(stream, h11.SERVER, max_head=MAX_HEAD)
        try:
            async with asyncio.timeout(self.head_timeout):
                request = await client.next_event()
        except TimeoutError:
            await self._refuse(client, *error_events(408, "the request head did not arrive in time"))
            return False
        except ProtocolError as exc:
            lenient = await _connect_without_host(bytes(stream.seen), sock) if "Host" in exc.message else None
            if lenient is None:
                await self._refuse(client, *error_events(exc.status, exc.message))
                return False
            client, request = lenient
        if not isinstance(request, h11.Request):
            return False  # the client closed before a whole head
        if not self.access.authorized(request.headers):
            await self._refuse(client, *closing_events(
                407, b"text/plain; charset=utf-8", b"egress-sidecar: proxy authentication required\n",
                [(b"Proxy-Authenticate", b'Basic realm="egress-sidecar"')]))
            return False
        if self.access.over_capacity:
            self.metrics.connections_refused.labels("max_connections").inc()
            self._cap_log.note()
            await self._refuse(client, *closing_events(503, b"application/json", self.access.over_capacity_body()))
            return False
        target = parse_authority(request.target) if request.method == b"CONNECT" else None
        if request.method == b"CONNECT" and target is None:
            await self._refuse(client, *error_events(400, "a CONNECT target must be HOST:PORT"))
            return False
        if target is not None:
            try:
                self.destinations.check_literal(*target)
            except DestinationRefused as exc:
                await self._refuse(client, *error_events(403, f"refused: {exc}"))
                return False
        if target is None:
            return await self._plain(client, sock, request, bytes(stream.seen))
        host, port = target
        if is_ip(host):
            await self._ip_literal(client, sock, host, port)
        elif self.hosts.matches(host):
            await client.send(_ESTABLISHED)
            await self.lane.serve(sock, host, port, client.h11.trailing_data[0])
        else:
            await self._relay(client, sock, host, port)
        return False

    def _log_cap_refusals(self, count: int) -> None:
        limit = self.access.max_connections
        event(log, logging.WARNING,
              f"refused {count} client connection(s) with 503 too_many_connections: SIDECAR_MAX_CONNECTIONS={limit} "
              f"reached ({self.access.active} open now); raise it if the app really needs more. At most one such line "
              f"every {REFUSAL_LOG_EVERY:g}s, each counting the refusals since the last",
              event="connections_refused", reason="max_connections", refused=count, limit=limit,
              open=self.access.active)

    async def _refuse(self, client: HttpConnection, *events: h11.Event) -> None:
        """Answer and close, lingering: a client still sending (a trickled head, an unread body) would
        otherwise get a reset that can destroy the answer before it reads it."""
        with contextlib.suppress(OSError, TimeoutError, h11.LocalProtocolError):
            async with asyncio.timeout(self.connect_timeout):
                await client.send(*events)
        await linger(client.stream.sock)

    async def _handoff(self, sock: socket.socket, seen: bytes) -> None:
        """Give the connection to mitmproxy as if it had accepted it, the bytes read so far first."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_HEAD, loop=loop)
        reader.feed_data(seen)  # before the transport exists: nothing can overtake these bytes
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock=sock)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        await self.handoff(reader, writer)

    async def _plain(self, client: HttpConnection, sock: socket.socket, request: h11.Request, seen: bytes) -> bool:
        """A plain proxy request: a token call is served by the lane; a refused destination gets 403;
        anything else goes to mitmproxy (True: handed off)."""
        target = absolute_target(request.target)  # None: mitmproxy answers a target it cannot use itself
        if target is not None:
            scheme, host, port = target
            on_token_host = self.hosts.matches(host)
            if on_token_host and is_token_request(request.method.decode("ascii"), origin_path(request.target)):
                await self.lane.serve_plain(client, request, host, port, scheme)
                return False
            try:
                member = self.lane.core.other_member(on_token_host)
                await self.destinations.check_route(host, port, member is not None)
            except DestinationRefused as exc:
                await self._refuse(client, *error_events(403, f"refused: {exc}"))
                return False
            except OSError:
                pass  # does not resolve: mitmproxy answers that itself
        await self._handoff(sock, seen)
        return True

    async def _ip_literal(self, client: HttpConnection, sock: socket.socket, host: str, port: int) -> None:
        """A CONNECT to an IP literal: answered first (the client sends its ClientHello only then), then
        served by the lane when the SNI names a token host, else relayed as it came."""
        await client.send(_ESTABLISHED)
        try:
            sni, first = await client_hello_sni(sock, client.h11.trailing_data[0], self.head_timeout)
        except UnfinishedHello as exc:
            event(log, logging.INFO, f"closed a tunnel to {host}:{port}: {exc}")
            return
        if sni is not None and self.hosts.matches(sni):
            await self.lane.serve(sock, sni.lower(), port, first, address=(host, port))
            return
        target = await self._open(host, port)
        if isinstance(target, str):
            event(log, logging.INFO, f"closed a tunnel: {target}")  # answered 200 already: only a close is left
            return
        try:
            await pipe_both(SocketStream(sock), target, self.idle_timeout, first)
        finally:
            target.close()

    async def _relay(self, client: HttpConnection, sock: socket.socket, host: str, port: int) -> None:
        target = await self._open(host, port)
        if isinstance(target, str):
            status = 403 if target.startswith("refused: ") else 502
            await self._refuse(client, *error_events(status, target))
            return
        try:
            await client.send(_ESTABLISHED)
            await pipe_both(SocketStream(sock), target, self.idle_timeout, client.h11.trailing_data[0])
        finally:
            target.close()

    async def _open(self, host: str, port: int) -> SocketStream | str:
        """The tunnel's target, direct or through a pair member (``SIDECAR_ROUTE=all``), counted; or why
        not (starting ``refused: `` when the destination rules say no)."""
        member = self.tunnel_member()
        try:
            async with asyncio.timeout(self.connect_timeout):
                target = await open_target(host, port, member, self.upstream, self.destinations)
        except ConnectFailure as exc:
            return f"refused: {exc.detail}" if exc.refused else exc.detail
        except TimeoutError:
            return f"connecting to {host}:{port} timed out"
        self.metrics.tunnels.labels("pair" if member else "direct").inc()
        return target
