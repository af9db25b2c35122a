"""The front door: every proxy client connects here first, on ``SIDECAR_LISTEN``.

It reads the client's first request head with h11, within a deadline (a head trickled byte by byte
is cut with ``408``, so no engine ever holds a connection for a head that never completes), checks
the client (loopback or proxy credentials, the connection cap), then gives the connection to the
engine that serves it:

- a ``CONNECT`` to a token host *name*: answered here and served by the token lane
  (:mod:`sidecar.proxy.lane`);
- a ``CONNECT`` to any other host name: answered and relayed here as raw bytes (:mod:`sidecar.net.pipe`):
  through a pair member when it is a Salesforce-owned domain (unless ``SIDECAR_SALESFORCE_TUNNELS=direct``)
  or with ``SIDECAR_ROUTE=all``, else direct;
- a ``CONNECT`` to an IP literal: answered, then the SNI of the client's TLS ClientHello decides (read
  within the head deadline, however late it comes): a token host's goes to the lane, anything else is
  relayed as a tunnel to that name would be;
- a plain proxy request (``GET http://...``): served on this connection, request by request (a token call
  by the core, refused over ``http://``; anything else forwarded to the very addresses the destination
  rules approved), each head read under the same deadline and size cap as the first.

Who may connect and use the proxy is the client access addon's (``addons/client_access.py``).
"""

from __future__ import annotations

import asyncio
import logging
import socket

import h11

from addons.client_access import ClientAccess
from sidecar.logs import event
from sidecar.metrics import Metrics
from sidecar.net.http1 import (
    MAX_HEAD,
    HttpConnection,
    ProtocolError,
    absolute_target,
    error_events,
    parse_authority,
)
from sidecar.net.pipe import pipe
from sidecar.net.streams import SocketStream, Stream
from sidecar.net.upstream import ConnectFailure, Connector, describe_error
from sidecar.proxy.destinations import DestinationRefused, Destinations, is_ip
from sidecar.proxy.lane import MAX_REQUESTS, Lane, refuse
from sidecar.proxy.relay import UnfinishedHello, client_hello_sni
from sidecar.token.call import is_token_request
from sidecar.token.hosts import TokenHosts, salesforce_domain_class
from sidecar.token.messages import origin_path

log = logging.getLogger("egress_sidecar.frontdoor")

HEAD_TIMEOUT = 30.0  # at most this long (and at most SIDECAR_IDLE_TIMEOUT) for a client's first head
_ESTABLISHED = h11.Response(status_code=200, reason=b"Connection established", headers=[])


async def _connect_without_host(seen: bytes, stream: SocketStream) -> tuple[HttpConnection, h11.Event] | None:
    """A ``CONNECT`` without the ``Host`` header HTTP/1.1 asks for (h11 refuses it; Squid, mitmproxy
    and most proxies accept it, and some clients rely on that), read again as if its target were
    its Host. ``seen``: every byte read from ``stream`` so far. None for anything else."""
    end = seen.find(b"\n")
    if not seen.startswith(b"CONNECT ") or end < 0:
        return None
    target = seen[len(b"CONNECT "):end].partition(b" ")[0]
    stream.unread(seen[:end + 1] + b"Host: " + target + b"\r\n" + seen[end + 1:])
    client = HttpConnection(stream, h11.SERVER)
    try:
        return client, await client.next_event(asyncio.get_running_loop().time() + HEAD_TIMEOUT)
    except ProtocolError:
        return None


class FrontDoor:
    def __init__(self, hosts: TokenHosts, metrics: Metrics, access: ClientAccess, *, connect_timeout: float,
                 idle_timeout: float, lane: Lane, connector: Connector, destinations: Destinations) -> None:
        self.destinations = destinations
        self.hosts = hosts
        self.metrics = metrics
        self.access = access
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.head_timeout = min(HEAD_TIMEOUT, idle_timeout)
        self.lane = lane
        self.connector = connector
        self._tasks: set[asyncio.Task[None]] = set()
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
        self.access.close()
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
            task = asyncio.create_task(self._accepted(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _accepted(self, sock: socket.socket) -> None:
        try:
            client_ip = str(sock.getpeername()[0])
        except OSError:
            sock.close()
            return
        if not self.access.client_connected(client_ip):  # refused before it holds a slot
            sock.close()
            return
        self.access.active += 1  # every client connection counts, from accept to close
        stream: SocketStream | None = None
        try:
            stream = await SocketStream.attach(sock)
            await self._serve(stream)
        except (OSError, TimeoutError):
            pass
        except Exception as exc:  # noqa: BLE001 - one bad client must not affect the others
            event(log, logging.ERROR, f"front door: {type(exc).__name__} on a client connection")
            log.debug("front door: unexpected error", exc_info=True)
        finally:
            self.access.active -= 1
            if stream is not None:
                stream.close()
            else:
                sock.close()

    async def _serve(self, stream: SocketStream) -> None:
        """Serve one client connection, from its first head to its end."""
        stream.recording = seen = bytearray()  # the first head's bytes, for _connect_without_host
        client = HttpConnection(stream, h11.SERVER, max_head=MAX_HEAD)
        try:
            request = await client.next_event(asyncio.get_running_loop().time() + self.head_timeout)
        except TimeoutError:
            await self._refuse(client, *error_events(408, "the request head did not arrive in time"))
            return
        except ProtocolError as exc:
            stream.recording = None
            lenient = await _connect_without_host(bytes(seen), stream) if "Host" in exc.message else None
            if lenient is None:
                await self._refuse(client, *error_events(exc.status, exc.message))
                return
            client, request = lenient
        stream.recording = None
        if not isinstance(request, h11.Request):
            return  # the client closed before a whole head
        pool = self.lane.forwarder.pool
        owner = pool.new_owner()  # plain requests on this connection reuse upstream connections no other client uses
        try:
            await self._serve_heads(client, stream, request, owner)
        finally:
            pool.forget(owner)

    async def _serve_heads(self, client: HttpConnection, stream: SocketStream, request: h11.Request,
                           owner: int) -> None:
        for _ in range(MAX_REQUESTS):  # bounded: plain proxy requests on one keep-alive connection
            refusal = self.access.request_head(request)
            if refusal is not None:
                await self._refuse(client, *refusal)
                return
            if request.method == b"CONNECT":
                await self._connect(client, stream, request)
                return
            if not await self._plain(client, request, owner) or not client.next_cycle():
                return
            try:  # the next head within the idle timeout, however slowly it trickles
                request = await client.next_event(asyncio.get_running_loop().time() + self.idle_timeout)
            except ProtocolError as exc:
                await self._refuse(client, *error_events(exc.status, exc.message))
                return
            if not isinstance(request, h11.Request):
                return

    async def _connect(self, client: HttpConnection, stream: SocketStream, request: h11.Request) -> None:
        target = parse_authority(request.target)
        if target is None:
            await self._refuse(client, *error_events(400, "a CONNECT target must be HOST:PORT"))
            return
        try:
            self.destinations.check_literal(*target)
        except DestinationRefused as exc:
            await self._refuse(client, *error_events(403, f"refused: {exc}"))
            return
        host, port = target
        if is_ip(host):
            await self._ip_literal(client, stream, host, port)
        elif self.hosts.matches(host):
            await client.send(_ESTABLISHED)
            await self.lane.serve(stream, host, port, client.leftover)
        else:
            await self._relay(client, stream, host, port)

    async def _refuse(self, client: HttpConnection, *events: h11.Event) -> None:
        await refuse(client, events, self.connect_timeout)

    async def _plain(self, client: HttpConnection, request: h11.Request, owner: int) -> bool:
        """One plain proxy request (``GET http://host/...``); whether the connection may carry another. A
        token call goes to the core; anything else is forwarded along its route, a direct connection to
        the very addresses the destination rules approved here (never resolved again, so a name that
        answers differently the second time cannot lead anywhere the rules refuse)."""
        target = absolute_target(request.target)
        if target is None:
            await self._refuse(client, *error_events(400, "a request to a proxy needs an absolute URL (http://host/path)"))
            return False
        scheme, host, port = target
        on_token_host = self.hosts.matches(host)
        if on_token_host and is_token_request(request.method.decode("ascii"), origin_path(request.target)):
            return await self.lane.proxied_token_call(client, request, host, port, scheme, owner)
        member = self.lane.routes.member_for(on_token_host)
        addresses = None
        try:
            if member is None:
                addresses = await self.destinations.resolve(host, port)
            else:
                self.destinations.check_literal(host, port)  # a name is the member's to resolve
        except DestinationRefused as exc:
            await self._refuse(client, *error_events(403, f"refused: {exc}"))
            return False
        except OSError as exc:
            await self._refuse(client, *error_events(502, f"cannot resolve {host}: {describe_error(exc)}"))
            return False
        return await self.lane.forward(client, request, host, port, member, tls=scheme == "https",
                                       addresses=addresses, owner=owner)

    async def _ip_literal(self, client: HttpConnection, stream: SocketStream, host: str, port: int) -> None:
        """A CONNECT to an IP literal: answered first (the client sends its ClientHello only then), then
        served by the lane when the SNI names a token host, else relayed as it came."""
        await client.send(_ESTABLISHED)
        try:
            sni, first = await client_hello_sni(stream, client.leftover, self.head_timeout)
        except UnfinishedHello as exc:
            event(log, logging.INFO, f"closed a tunnel to {host}:{port}: {exc}")
            return
        if sni is not None and self.hosts.matches(sni):
            await self.lane.serve(stream, sni.lower(), port, first, address=(host, port))
            return
        target = await self._open(host, port, sni)
        if isinstance(target, str):
            event(log, logging.INFO, f"closed a tunnel: {target}")  # answered 200 already: only a close is left
            return
        try:
            await pipe(stream, target, self.idle_timeout, first)
        finally:
            target.close()

    async def _relay(self, client: HttpConnection, stream: SocketStream, host: str, port: int) -> None:
        target = await self._open(host, port, host)
        if isinstance(target, str):
            status = 403 if target.startswith("refused: ") else 502
            await self._refuse(client, *error_events(status, target))
            return
        try:
            await client.send(_ESTABLISHED)
            await pipe(stream, target, self.idle_timeout, client.leftover)
        finally:
            target.close()

    async def _open(self, host: str, port: int, name: str | None) -> Stream | str:
        """The tunnel's target, direct or through a pair member, counted; or why not (starting ``refused: ``
        when the destination rules say no). ``name``: the host the tunnel is for (the CONNECT's, or an IP
        literal's TLS SNI; None when unknown): a Salesforce-owned domain's is counted per domain class and
        routed as ``SIDECAR_SALESFORCE_TUNNELS`` says."""
        domain_class = salesforce_domain_class(name) if name else None
        member = self.lane.routes.tunnel_member(salesforce=domain_class is not None)
        deadline = asyncio.get_running_loop().time() + self.connect_timeout
        try:
            target = await self.connector.open(host, port, member, deadline=deadline, tls=False)
        except ConnectFailure as exc:
            return f"refused: {exc.detail}" if exc.refused else exc.detail
        route = "pair" if member else "direct"
        self.metrics.tunnels.labels(route).inc()
        if domain_class is not None:
            self.metrics.salesforce_tunnels.labels(domain_class, route).inc()
        return target
