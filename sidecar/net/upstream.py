"""Connections to the servers behind the sidecar: direct or through a pair member (CONNECT), over TLS,
kept alive per (member, host, port) and reused only when it is safe (:class:`UpstreamPool` says exactly
what that guarantees).

A connection goes back to the pool only when its last exchange ended cleanly (h11 back in ``IDLE`` on
both sides) and nothing unread is buffered or readable on it, it is checked again when it is taken out,
and only the client connection whose exchanges it carried may take it: a server that sent bytes past
the response it framed (a ``204`` or ``HEAD`` answer with a body, an unsolicited second response) has its
connection closed, and no answer on it can reach another caller, however late it arrives.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import itertools
import ssl
import time
from collections import deque
from dataclasses import dataclass, field

import h11

from sidecar.config import Upstream
from sidecar.egress.pair import Member
from sidecar.net.http1 import HttpConnection, ProtocolError, h11_message, raw_headers
from sidecar.net.resolver import TOKEN_LOOKUPS, Resolver
from sidecar.net.streams import SocketStream, Stream, TlsStream, open_tcp
from sidecar.proxy.destinations import DestinationRefused, Destinations
from sidecar.token.messages import Answer

MAX_RESPONSE_BYTES = 1024 * 1024  # a token response is ~2 KB; 1 MiB is generous and bounded
POOL_IDLE_SECONDS = 20.0  # below common server keep-alive timeouts, so we rarely write into a closed socket
POOL_MAX_PER_KEY = 16
SPARES_PER_KEY = 1  # connections opened ahead, per key, for clients that have none of their own yet
MAX_INTERIM = 10  # 1xx answers skipped before the final one


class ConnectFailure(Exception):
    """The connection could not be set up; no byte of the request was sent."""

    def __init__(self, reason: str, detail: str, member_fault: bool = True, ejects: bool = True,
                 refused: bool = False) -> None:
        super().__init__(detail)
        self.reason = reason  # one of metrics.FAILURE_REASONS, or "tls"
        self.detail = detail
        self.member_fault = member_fault  # another member might do better: fail over
        self.ejects = ejects  # evidence the member itself is broken (not the target behind it)
        self.refused = refused  # the destination rules refused it (sidecar.proxy.destinations): a 403, not a 502


class SendFailure(Exception):
    """Failed after request bytes left: the request may have reached the server."""


def describe_error(exc: BaseException) -> str:
    """A short, credential-free description of a network error."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ProtocolError):
        return exc.message
    if isinstance(exc, h11.ProtocolError):
        return h11_message(exc)
    if isinstance(exc, ssl.SSLError):
        return (exc.reason or str(exc)).lower().replace("_", " ")[:120]
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text[:200]


def _classify_oserror(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError) or (isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED):
        return "refused"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return "reset"
    return "unreachable"


def authority(host: str, port: int) -> bytes:
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode("idna")


async def open_tunnel(stream: SocketStream, upstream: Upstream, member: Member, host: str, port: int) -> SocketStream:
    """Ask ``member`` (connected on ``stream``) for a tunnel to host:port, with the proxy credentials on
    the CONNECT only. Returns the tunnel's stream; raises ConnectFailure (nothing of a request left)."""
    http = HttpConnection(stream, h11.CLIENT)
    target = authority(host, port)
    try:
        await http.send(h11.Request(method=b"CONNECT", target=target, headers=[
            (b"Host", target), (b"Proxy-Authorization", upstream.proxy_authorization)]), h11.EndOfMessage())
        for _ in range(MAX_INTERIM):
            event = await http.next_event()
            if not isinstance(event, h11.InformationalResponse):
                break
    except ProtocolError:
        raise ConnectFailure("proxy_error", f"pair member {member.label} answered the CONNECT with garbage") from None
    except (OSError, h11.LocalProtocolError) as exc:
        raise ConnectFailure("reset", f"pair member {member.label} failed during the CONNECT: {describe_error(exc)}") \
            from None
    if not isinstance(event, h11.Response):
        raise ConnectFailure("proxy_error", f"pair member {member.label} closed the connection instead of answering")
    if event.status_code == 407:
        raise ConnectFailure(
            "auth_failed", f"pair member {member.label} refused the proxy credentials (407): check QUOTAGUARDSTATIC_URL")
    if not 200 <= event.status_code < 300:
        # Often about the target (a mistyped My Domain, an origin the member cannot reach), not the
        # member: try another member, but do not eject this one for it (Squid does not blame a parent
        # for an origin's errors either).
        raise ConnectFailure(
            "proxy_error", f"pair member {member.label} answered the CONNECT with {event.status_code}", ejects=False)
    return SocketStream(stream.sock, http.h11.trailing_data[0])


async def read_answer(http: HttpConnection, method: bytes, cap: int = MAX_RESPONSE_BYTES) -> Answer:
    """Read one whole final response (interim 1xx answers skipped). Raises SendFailure for anything
    malformed, incomplete or over ``cap``; OSErrors from the stream pass through."""
    head: h11.Response | None = None
    body = bytearray()
    interim = 0
    for _ in range(MAX_INTERIM + cap + 2):  # bounded: every Data event brings at least one byte
        try:
            event = await http.next_event()
        except ProtocolError as exc:
            raise SendFailure(f"the server answered with something that is not HTTP/1.1 ({exc.message})") from None
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 101:
                raise SendFailure("the server switched protocols (101) instead of answering")
            interim += 1
            if interim > MAX_INTERIM:  # as many as the forwarder passes on, not as many as the loop allows
                raise SendFailure(f"too many interim (1xx) answers (more than {MAX_INTERIM})")
            continue
        if isinstance(event, h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > cap:
                raise SendFailure(f"response too large (more than {cap} bytes)")
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return Answer(head.status_code, raw_headers(head), bytes(body), reason=bytes(head.reason), parsed=True)
        else:  # ConnectionClosed, PAUSED
            raise SendFailure("the connection closed before a complete response")
    raise SendFailure("the answer did not end")  # pragma: no cover - bounded above


@dataclass
class UpstreamConn:
    key: PoolKey
    http: HttpConnection
    last_used: float = field(default_factory=time.monotonic)

    @property
    def stream(self) -> Stream:
        return self.http.stream

    def close(self) -> None:
        self.http.stream.close()


PoolKey = tuple[str, str | None, str, int, str]
Owner = int | None  # a client connection (UpstreamPool.new_owner); None: nobody's, used once


class UpstreamPool:
    """Keep-alive connections per (purpose, member, host, port, TLS server name); ``member`` None means
    direct. Token calls (``purpose="token"``) never share a connection with other requests: only the
    token endpoint's answers ever travel on theirs, so a misbehaving endpoint elsewhere on the same host
    cannot put bytes in front of a token call.

    Who may reuse a connection. HTTP/1.1 does not say which request an answer belongs to: an answer an
    origin sends unasked (a late duplicate, a ``408`` on an idle connection) that arrives after the next
    request was written is read as that request's answer, and no check can tell the two apart once the
    request has left. So:

    - **one client connection per upstream connection.** A connection carries the exchanges of one client
      connection only (its *owner*), as a tunnel would: whatever an origin sends on it, however late,
      can reach only the client whose requests travelled on it, never another caller. Without an owner
      a connection serves one exchange and is closed.
    - **spares for new clients.** A client's first request takes a *spare*: a connection opened ahead
      (TCP, the member's CONNECT, TLS) that never carried a request, so nothing of anyone's exchange is on
      it and no handshake is waited for. Each time a spare is taken (or a connection had to be opened),
      one is opened in the background for the next client once that exchange is over (at most
      SPARES_PER_KEY per key).
    - **nothing arrived since the last exchange ended**, checked at the moment of reuse: h11 idle on both
      sides, nothing buffered in h11, the TLS object or the socket, and an end of stream counts as
      something; an exchange whose answer is followed by more bytes closes its connection.

    Not guaranteed: on one client's own kept-alive connection, an answer the origin sends unasked after
    that client's next request was written is read as its answer. That is what the client gets on a
    plain tunnel (``HTTPS_PROXY`` straight to the pair) too; only a new connection per request would
    avoid it.
    """

    def __init__(self, upstream: Upstream | None, ssl_context: ssl.SSLContext, connect_timeout: float,
                 destinations: Destinations | None = None, token_resolver: Resolver | None = None) -> None:
        self.upstream = upstream
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        # Checked for direct connections (a member resolves names itself; members are IP literals).
        self.destinations = destinations or Destinations(shared_proxy=False)
        # Direct token calls look their host up here, never where clients' lookups may be stuck.
        self.token_resolver = token_resolver or Resolver("token", TOKEN_LOOKUPS)
        # Idle connections by owner, then key; owner None holds the spares (never used for a request).
        self._idle: dict[Owner, dict[PoolKey, deque[UpstreamConn]]] = {}
        self._warming: dict[PoolKey, asyncio.Task[None]] = {}
        self._wanted: dict[PoolKey, Member | None] = {}  # keys whose spare was taken (or missing): make one
        self._owners = itertools.count(1)
        self._swept = time.monotonic()
        self._closed = False

    def new_owner(self) -> int:
        """An owner for one client connection's upstream connections (never handed out twice)."""
        return next(self._owners)

    async def acquire(self, member: Member | None, host: str, port: int, server_name: str | None = None,
                      purpose: str = "other", owner: Owner = None) -> tuple[UpstreamConn, bool]:
        """A connection ready for a request for ``owner``: its own idle one, else a spare, else a new one;
        and whether it was idle before (the server may have closed it meanwhile). Raises ConnectFailure."""
        key = (purpose, member.label if member else None, host, port, server_name or host)
        now = time.monotonic()
        if now - self._swept > POOL_IDLE_SECONDS:
            self._sweep(now)
        if owner is not None:
            conn = self._take(owner, key, now)
            if conn is not None:
                return conn, True
        spare = self._take(None, key, now)
        self._wanted[key] = member  # a spare for the next client, opened once this exchange is over
        if spare is not None:
            return spare, True
        return await self._open(member, key), False

    def _take(self, owner: Owner, key: PoolKey, now: float) -> UpstreamConn | None:
        """An idle connection of ``owner`` for ``key`` on which nothing arrived since it went idle."""
        idle = self._idle.get(owner, {}).get(key)
        while idle:
            conn = idle.pop()
            if now - conn.last_used < POOL_IDLE_SECONDS and conn.http.reusable():
                return conn
            conn.close()
        return None

    def _warm(self, key: PoolKey) -> None:
        """Open a spare for ``key`` in the background (if one was taken for it), unless one is there or on its
        way. Called when an exchange is over, so its TLS handshake does not hold up a call in flight."""
        if key not in self._wanted:
            return
        member = self._wanted.pop(key)
        if self._closed or key in self._warming or len(self._idle.get(None, {}).get(key, ())) >= SPARES_PER_KEY:
            return
        task = asyncio.get_running_loop().create_task(self._open_spare(member, key), name="upstream-spare")
        self._warming[key] = task
        task.add_done_callback(lambda _: self._warming.pop(key, None))

    async def _open_spare(self, member: Member | None, key: PoolKey) -> None:
        try:
            conn = await self._open(member, key)
        except ConnectFailure:
            return  # the next client opens its own, and a failure it meets is counted then
        if self._closed:
            conn.close()
            return
        self._idle.setdefault(None, {}).setdefault(key, deque()).append(conn)

    def _sweep(self, now: float) -> None:
        """Close the connections idle past POOL_IDLE_SECONDS and forget owners and hosts with none left:
        the pool holds no socket, and no entry, for a host (an org's My Domain) it will not see again."""
        self._swept = now
        self._wanted.clear()  # (a key still in use asks again at its next acquire)
        for owner in list(self._idle):
            keys = self._idle[owner]
            for key in list(keys):
                idle = keys[key]
                while idle and now - idle[0].last_used >= POOL_IDLE_SECONDS:  # oldest first (appended in order)
                    idle.popleft().close()
                if not idle:
                    del keys[key]
            if not keys:
                del self._idle[owner]

    def release(self, conn: UpstreamConn, owner: Owner = None) -> None:
        """Back to ``owner``'s idle connections if its exchange ended cleanly and nothing is left unread;
        else (or without an owner) closed. A spare taken for this key is made again now."""
        self._warm(conn.key)
        if owner is None or self._closed or not conn.http.next_cycle() or not conn.http.reusable():
            conn.close()
            return
        idle = self._idle.setdefault(owner, {}).setdefault(conn.key, deque())
        if len(idle) >= POOL_MAX_PER_KEY:
            conn.close()
            return
        conn.last_used = time.monotonic()
        idle.append(conn)

    def forget(self, owner: Owner) -> None:
        """The client connection ``owner`` is gone: close its idle connections."""
        if owner is None:
            return
        for idle in self._idle.pop(owner, {}).values():
            while idle:
                idle.pop().close()

    def close_all(self) -> None:
        self._closed = True
        for task in self._warming.values():
            task.cancel()
        for keys in self._idle.values():
            for idle in keys.values():
                while idle:
                    idle.pop().close()
        self._idle.clear()

    async def _open(self, member: Member | None, key: PoolKey) -> UpstreamConn:
        _, _, host, port, server_name = key
        target = member.address.address if member else (host, port)
        where = f"pair member {member.label}" if member else f"{host}:{port}"
        # One deadline for the whole set-up: TCP, the member's CONNECT answer and the TLS handshake.
        deadline = asyncio.get_running_loop().time() + self.connect_timeout
        resolver = self.token_resolver if key[0] == "token" else None
        resolve = None if member is not None else functools.partial(self.destinations.resolve, resolver=resolver)
        try:
            async with asyncio.timeout_at(deadline):
                sock = await open_tcp(*target, resolve)
        except DestinationRefused as exc:
            raise ConnectFailure("refused", str(exc), member_fault=False, ejects=False, refused=True) from None
        except (OSError, TimeoutError) as exc:
            raise ConnectFailure(_classify_oserror(exc), f"cannot connect to {where}: {describe_error(exc)}") from None
        stream = SocketStream(sock)
        try:
            async with asyncio.timeout_at(deadline):
                if member is not None:
                    assert self.upstream is not None
                    stream = await open_tunnel(stream, self.upstream, member, host, port)
                tls = TlsStream.client(stream, self.ssl_context, server_name)
                await tls.handshake()
        except ConnectFailure:
            sock.close()
            raise
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise ConnectFailure(
                "tls", f"TLS verification of {server_name} failed ({exc.verify_message}); set SIDECAR_UPSTREAM_CA "
                "if a corporate CA re-signs it", member_fault=False) from None
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            sock.close()
            reason = "timeout" if isinstance(exc, TimeoutError) else "reset"
            raise ConnectFailure(reason, f"setting up the connection via {where} failed: {describe_error(exc)}") \
                from None
        return UpstreamConn(key, HttpConnection(tls, h11.CLIENT))
