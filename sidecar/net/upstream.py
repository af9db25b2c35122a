"""Connections to the servers behind the sidecar: direct or through a pair member (CONNECT), plain or
over TLS (:class:`Connector`), kept alive per (member, host, port) and reused only when it is safe.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import h11

from sidecar.config import Upstream
from sidecar.egress.pair import Member
from sidecar.net.answer import Answer
from sidecar.net.echo import (
    MAX_ECHO_BYTES,
    PROXY_407,
    EchoError,
    EchoTarget,
    parse_echo_body,
)
from sidecar.net.http1 import HttpConnection, ProtocolError, h11_message, raw_headers
from sidecar.net.resolver import TOKEN_LOOKUPS, AddrInfo, DestinationRefused, Resolver
from sidecar.net.streams import SocketStream, Stream, TlsStream, connect_any, open_tcp

MAX_RESPONSE_BYTES = 1024 * 1024  # a token response is ~2 KB; 1 MiB is generous and bounded
POOL_IDLE_SECONDS = 20.0  # below common server keep-alive timeouts, so we rarely write into a closed socket
POOL_MAX_PER_KEY = 16
SPARES_PER_KEY = 1  # connections opened ahead, per key, for clients that have none of their own yet
MAX_EGRESS_TRIES = 6  # new connections through one member to find an egress IP a call may use (1 in 64 missed at 50/50)
MAX_INTERIM = 10  # 1xx answers skipped before the final one


class ConnectFailure(Exception):
    """The connection could not be set up; no byte of the request was sent."""

    def __init__(self, reason: str, detail: str, member_fault: bool = True, ejects: bool = True,
                 refused: bool = False, *, stage: str = "tcp", cause: str | None = None) -> None:
        super().__init__(detail)
        self.stage = stage  # "tcp" (to the member or the server), "tunnel" (the member's CONNECT) or "tls"
        self.cause = cause or detail  # the network's own words, without where
        self.reason = reason  # one of metrics.FAILURE_REASONS, or "tls"
        self.detail = detail
        self.member_fault = member_fault  # another member might do better: fail over
        self.ejects = ejects  # evidence the member itself is broken (not the target behind it)
        self.refused = refused  # the destination rules refused it (DestinationRules): a 403, not a 502


class NoAcceptableEgress(ConnectFailure):
    """Every connection opened through a member for a call left from an egress IP the call may not use:
    nothing of it was sent (try another member, or refuse it)."""

    def __init__(self, member: Member, seen: list[str | None]) -> None:
        ips = ", ".join(sorted({ip or "unverified" for ip in seen}))
        super().__init__("egress_refused", f"pair member {member.label}: {len(seen)} new connection(s) left from "
                         f"{ips}, none that this call may use", ejects=False)
        self.seen = seen


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


async def open_tunnel(stream: SocketStream, upstream: Upstream, member: Member, host: str, port: int,
                      deadline: float | None = None) -> None:
    """Ask ``member`` (connected on ``stream``) for a tunnel to host:port, with the proxy credentials on
    the CONNECT only, by ``deadline``; ``stream`` then carries the tunnel. Raises ConnectFailure (nothing of
    a request left)."""
    http = HttpConnection(stream, h11.CLIENT)
    target = authority(host, port)
    try:
        await http.send(h11.Request(method=b"CONNECT", target=target, headers=[
            (b"Host", target), (b"Proxy-Authorization", upstream.proxy_authorization)]), h11.EndOfMessage(),
            deadline=deadline)
        for _ in range(MAX_INTERIM):
            event = await http.next_event(deadline)
            if not isinstance(event, h11.InformationalResponse):
                break
    except ProtocolError:
        raise ConnectFailure("proxy_error", f"pair member {member.label} answered the CONNECT with garbage",
                             stage="tunnel") from None
    except TimeoutError:
        raise ConnectFailure("timeout", f"pair member {member.label} did not answer the CONNECT in time",
                             stage="tunnel", cause="timed out") from None
    except (OSError, h11.LocalProtocolError) as exc:
        raise ConnectFailure("reset", f"pair member {member.label} failed during the CONNECT: {describe_error(exc)}",
                             stage="tunnel") from None
    if not isinstance(event, h11.Response):
        raise ConnectFailure("proxy_error", f"pair member {member.label} closed the connection instead of answering",
                             stage="tunnel")
    if event.status_code == 407:
        raise ConnectFailure(
            "auth_failed", f"pair member {member.label} refused the proxy credentials (407): check QUOTAGUARDSTATIC_URL",
            stage="tunnel")
    if not 200 <= event.status_code < 300:
        # Often about the target (a mistyped My Domain, an origin the member cannot reach), not the
        # member: try another member, but do not eject this one for it (Squid does not blame a parent
        # for an origin's errors either).
        raise ConnectFailure(
            "proxy_error", f"pair member {member.label} answered the CONNECT with {event.status_code}", ejects=False,
            stage="tunnel")
    stream.unread(http.leftover)


async def read_answer(http: HttpConnection, method: bytes, cap: int = MAX_RESPONSE_BYTES,
                      deadline: float | None = None) -> Answer:
    """Read one whole final response (interim 1xx answers skipped), by ``deadline``. Raises SendFailure for
    anything malformed, incomplete or over ``cap``; OSErrors (and TimeoutError) from the stream pass through."""
    head: h11.Response | None = None
    body = bytearray()
    interim = 0
    for _ in range(MAX_INTERIM + cap + 2):  # bounded: every Data event brings at least one byte
        try:
            event = await http.next_event(deadline)
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


_CONN_IDS = itertools.count(1)


@dataclass
class UpstreamConn:
    key: PoolKey
    http: HttpConnection
    last_used: float = field(default_factory=time.monotonic)
    egress_ip: str | None = None  # verified on this very connection (a member's), else None
    id: int = field(default_factory=lambda: next(_CONN_IDS))

    @property
    def stream(self) -> Stream:
        return self.http.stream

    def close(self) -> None:
        self.http.stream.close()


class DestinationRules(Protocol):
    """Where the sidecar may connect on a client's behalf (sidecar.proxy.destinations.Destinations); both raise
    DestinationRefused."""

    def check_literal(self, host: str, port: int) -> None: ...
    async def resolve(self, host: str, port: int, resolver: Resolver | None = None) -> list[AddrInfo]: ...


class EgressVerifier(Protocol):
    """Which members' new connections have their egress IP verified, and what verification showed
    (sidecar.egress.verify.Verifier)."""

    def echo_for(self, member: Member) -> EchoTarget | None: ...
    def verified(self, member: Member, ip: str) -> None: ...
    def failed(self, member: Member, reason: str, detail: str) -> None: ...


PoolKey = tuple[str, str | None, str, int, str | None]  # (purpose, member, host, port, TLS server name or None)
Owner = int | None  # a client connection (UpstreamPool.new_owner); None: nobody's, used once
Addresses = list[tuple[int, int, int, tuple[object, ...]]]  # getaddrinfo's, already checked


VERIFY_RESULTS = ("verified", "echo_failed", "connect_refused")


class VerifyFailure(Exception):
    """The egress IP of a new connection through a member could not be learnt on that connection, or the
    member would not open a tunnel after the question (nothing of a request was sent): ``reason`` is one of
    VERIFY_RESULTS; the caller opens a connection without asking."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


async def ask_echo(http: HttpConnection, target: EchoTarget, proxy_authorization: bytes | None, *,
                   close: bool = False, deadline: float | None = None) -> str:
    """Ask the IP echo once on ``http`` (absolute-form with the credentials on a proxy connection, or
    origin-form in a tunnel: ``proxy_authorization`` None) and return the IP it names. Raises EchoError
    (the proxy's own 407 with ``member_down``), SendFailure and the stream's OSErrors."""
    await http.send(target.request(proxy_authorization, close=close), h11.EndOfMessage(), deadline=deadline)
    answer = await read_answer(http, b"GET", MAX_ECHO_BYTES, deadline)
    if answer.status == 407:
        raise EchoError(PROXY_407, member_down=True)
    if answer.status in (403, 502, 503):
        raise EchoError(f"proxy answered HTTP {answer.status}")
    if answer.status != 200:
        raise EchoError(f"echo answered HTTP {answer.status}")
    return parse_echo_body(answer.body)


class Connector:
    """The one way the sidecar opens a connection to a server behind it: TCP (direct, or to a pair member),
    a CONNECT through the member (its credentials on the CONNECT only), then TLS when asked. Token calls,
    forwarded requests, relayed tunnels and the egress probes all connect here. Direct connections go to
    the addresses the destination rules approved: given by the caller (who checked them), or resolved and
    checked here; a name is never resolved a second time. Raises ConnectFailure (``stage`` says which step
    failed), also when ``deadline`` (the event loop's clock) passes."""

    def __init__(self, upstream: Upstream | None, ssl_context: ssl.SSLContext,
                 destinations: DestinationRules | None = None) -> None:
        self.upstream = upstream
        self.ssl_context = ssl_context
        self.destinations = destinations  # None: no rules (the sidecar's own probes)
        self.resolver = Resolver("token", TOKEN_LOOKUPS)  # without rules: who looks a direct destination up

    async def open(self, host: str, port: int, member: Member | None, *, deadline: float, tls: bool,
                   server_name: str | None = None, addresses: Addresses | None = None,
                   tunnel: bool = True, resolver: Resolver | None = None) -> Stream:
        """A stream to host:port. Through ``member`` with ``tunnel=False``, the stream to the member itself
        (for requests in absolute form, with the proxy credentials on each). ``resolver``: who looks a direct
        destination's name up (by default the destination rules' own, the clients' one)."""
        stream, _ = await self._open(host, port, member, deadline, tls, server_name, addresses, tunnel, None,
                                     resolver)
        return stream

    async def open_verified(self, host: str, port: int, member: Member, *, deadline: float,
                            server_name: str | None, echo: EchoTarget, echo_deadline: float) -> tuple[Stream, str]:
        """A TLS stream to host:port through ``member``, and the egress IP of this very connection: before
        the CONNECT, the IP echo is asked on the same proxy connection (by ``echo_deadline``). Raises
        VerifyFailure when the echo cannot be asked there or the member will not open the tunnel after it
        (open one without asking then), ConnectFailure as :meth:`open`."""
        stream, ip = await self._open(host, port, member, deadline, True, server_name, None, True, (echo, echo_deadline),
                                      None)
        assert ip is not None
        return stream, ip

    async def _open(self, host: str, port: int, member: Member | None, deadline: float, tls: bool,
                    server_name: str | None, addresses: Addresses | None, tunnel: bool,
                    verify: tuple[EchoTarget, float] | None, resolver: Resolver | None) -> tuple[Stream, str | None]:
        where = f"pair member {member.label}" if member else f"{host}:{port}"
        try:
            async with asyncio.timeout_at(deadline):
                if member is not None:
                    if self.destinations is not None:
                        self.destinations.check_literal(host, port)  # a name is the member's to resolve
                    sock = await open_tcp(*member.address.address)
                elif addresses is not None:
                    sock = await connect_any(addresses, host)
                elif self.destinations is not None:  # the rules judge what the name resolves to
                    sock = await open_tcp(host, port, functools.partial(self.destinations.resolve, resolver=resolver))
                else:
                    sock = await open_tcp(host, port, (resolver or self.resolver).getaddrinfo)
        except DestinationRefused as exc:
            raise ConnectFailure("refused", str(exc), member_fault=False, ejects=False, refused=True) from None
        except (OSError, TimeoutError) as exc:
            raise ConnectFailure(_classify_oserror(exc), f"cannot connect to {where}: {describe_error(exc)}",
                                 cause=describe_error(exc)) from None
        try:
            raw = await SocketStream.attach(sock)
        except OSError as exc:
            raise ConnectFailure(_classify_oserror(exc), f"cannot connect to {where}: {describe_error(exc)}",
                                 cause=describe_error(exc)) from None
        stream: Stream = raw
        egress_ip: str | None = None
        stage = "tunnel"
        try:
            if member is not None and verify is not None:
                egress_ip = await self._verify(raw, member, *verify)
            if member is not None and tunnel:
                assert self.upstream is not None
                try:
                    await open_tunnel(raw, self.upstream, member, host, port, deadline)
                except ConnectFailure as exc:
                    if egress_ip is None or exc.reason == "auth_failed":
                        raise
                    raise VerifyFailure("connect_refused", f"pair member {member.label} would not open a "
                                        f"tunnel after the IP echo on the same connection ({exc.detail})") from None
            if tls:
                stage = "tls"
                stream = TlsStream.client(raw, self.ssl_context, server_name or host)
                await stream.handshake(deadline)
        except (ConnectFailure, VerifyFailure):
            raw.abort()
            raise
        except ssl.SSLCertVerificationError as exc:
            raw.abort()
            raise ConnectFailure(
                "tls", f"TLS verification of {server_name or host} failed ({exc.verify_message}); set "
                "SIDECAR_UPSTREAM_CA if a corporate CA re-signs it", member_fault=False, stage="tls") from None
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raw.abort()
            reason = "timeout" if isinstance(exc, TimeoutError) else "reset"
            raise ConnectFailure(reason, f"setting up the connection via {where} failed: {describe_error(exc)}",
                                 stage=stage, cause=describe_error(exc)) from None
        except BaseException:  # cancelled: the socket is not left open
            raw.abort()
            raise
        return stream, egress_ip

    async def _verify(self, raw: SocketStream, member: Member, echo: EchoTarget, echo_deadline: float) -> str:
        """Ask the echo on the member's connection (the CONNECT then goes on the same one); its IP."""
        assert self.upstream is not None
        http = HttpConnection(raw, h11.CLIENT)
        try:
            ip = await ask_echo(http, echo, self.upstream.proxy_authorization, deadline=echo_deadline)
        except EchoError as exc:
            if exc.member_down:
                raise ConnectFailure("auth_failed", f"pair member {member.label} refused the proxy credentials (407): "
                                     "check QUOTAGUARDSTATIC_URL", stage="tunnel") from None
            raise VerifyFailure("echo_failed", f"IP echo through pair member {member.label}: {exc}") from None
        except (SendFailure, OSError, TimeoutError, h11.LocalProtocolError) as exc:
            why = "no answer in time" if isinstance(exc, TimeoutError) else describe_error(exc) \
                if not isinstance(exc, SendFailure) else str(exc)
            raise VerifyFailure("echo_failed", f"IP echo through pair member {member.label}: {why}") from None
        if not http.next_cycle():
            raise VerifyFailure("connect_refused", f"pair member {member.label} closes its connection after a "
                                "request: the CONNECT cannot follow the IP echo on it")
        raw.unread(http.leftover)
        return ip


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

    def __init__(self, connector: Connector, connect_timeout: float, verifier: EgressVerifier | None = None,
                 token_resolver: Resolver | None = None) -> None:
        self.connector = connector
        self.connect_timeout = connect_timeout
        self.verifier = verifier  # which members' connections have their egress IP verified, and what it showed
        # Direct token calls look their host up here, never where clients' lookups may be stuck.
        self.token_resolver = token_resolver or Resolver("token", TOKEN_LOOKUPS)
        # Idle connections by owner, then key; owner None holds the spares (never used for a request).
        self._idle: dict[Owner, dict[PoolKey, deque[UpstreamConn]]] = {}
        self._warming: dict[PoolKey, asyncio.Task[None]] = {}
        # keys whose spare was taken (or missing): make one, through this member, to these approved addresses
        self._wanted: dict[PoolKey, tuple[Member | None, Addresses | None]] = {}
        self._owners = itertools.count(1)
        self._swept = time.monotonic()
        self._closed = False

    def new_owner(self) -> int:
        """An owner for one client connection's upstream connections (never handed out twice)."""
        return next(self._owners)

    async def acquire(self, member: Member | None, host: str, port: int, server_name: str | None = None,
                      purpose: str = "other", *, tls: bool = True, addresses: Addresses | None = None,
                      accept: Callable[[str | None], bool] | None = None,
                      owner: Owner = None, avoid: int | None = None) -> tuple[UpstreamConn, bool]:
        """A connection ready for a request for ``owner``: its own idle one, else a spare, else a new one; and
        whether it was idle before (the server may have closed it meanwhile). Over TLS to ``server_name``
        (default ``host``), or plain with ``tls=False``. ``addresses``: where a direct connection may go
        (checked by the caller; a pooled one went to such an address too). ``accept``: whether a connection
        whose egress IP is this (None: not verified) may carry the request; new connections it turns down
        become spares for other calls (they never carried a request), and at most MAX_EGRESS_TRIES are
        opened for it (then NoAcceptableEgress). ``avoid``: a connection not to take (its ``id``). Raises
        ConnectFailure."""
        key = (purpose, member.label if member else None, host, port, (server_name or host) if tls else None)
        now = time.monotonic()
        if now - self._swept > POOL_IDLE_SECONDS:
            self._sweep(now)
        if owner is not None:
            conn = self._take(owner, key, now, accept, avoid)
            if conn is not None:
                return conn, True
        spare = self._take(None, key, now, accept, avoid)
        self._wanted[key] = (member, addresses)  # a spare for the next client, opened once this exchange is over
        if spare is not None:
            return spare, True
        seen: list[str | None] = []
        for _ in range(MAX_EGRESS_TRIES if accept is not None else 1):
            conn = await self._open(member, key, addresses)
            if accept is None or accept(conn.egress_ip):
                return conn, False
            seen.append(conn.egress_ip)
            self._park(conn)  # never used: another app or org may redeem through its egress IP
        assert member is not None
        raise NoAcceptableEgress(member, seen)

    def _take(self, owner: Owner, key: PoolKey, now: float, accept: Callable[[str | None], bool] | None,
              avoid: int | None = None) -> UpstreamConn | None:
        """An idle connection of ``owner`` for ``key`` on which nothing arrived since it went idle (and whose
        egress IP ``accept`` takes), the most recently used first."""
        idle = self._idle.get(owner, {}).get(key)
        if not idle:
            return None
        for conn in reversed(list(idle)):
            if conn.id == avoid:
                continue
            fresh = now - conn.last_used < POOL_IDLE_SECONDS and conn.http.reusable()
            if fresh and accept is not None and not accept(conn.egress_ip):
                continue
            idle.remove(conn)
            if fresh:
                return conn
            conn.close()
        return None

    def _park(self, conn: UpstreamConn) -> None:
        """A connection that carried no request joins the spares (bounded)."""
        idle = self._idle.setdefault(None, {}).setdefault(conn.key, deque())
        if self._closed or len(idle) >= POOL_MAX_PER_KEY:
            conn.close()
            return
        conn.last_used = time.monotonic()
        idle.append(conn)

    def _warm(self, key: PoolKey) -> None:
        """Open a spare for ``key`` in the background (if one was taken for it), unless one is there or on its
        way. Called when an exchange is over, so its handshake does not hold up a call in flight."""
        if key not in self._wanted:
            return
        member, addresses = self._wanted.pop(key)
        if self._closed or key in self._warming or len(self._idle.get(None, {}).get(key, ())) >= SPARES_PER_KEY:
            return
        task = asyncio.get_running_loop().create_task(self._open_spare(member, key, addresses), name="upstream-spare")
        self._warming[key] = task
        task.add_done_callback(lambda _: self._warming.pop(key, None))

    async def _open_spare(self, member: Member | None, key: PoolKey, addresses: Addresses | None) -> None:
        try:
            conn = await self._open(member, key, addresses)
        except ConnectFailure:
            return  # the next client opens its own, and a failure it meets is counted then
        self._park(conn)

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

    async def _open(self, member: Member | None, key: PoolKey, addresses: Addresses | None) -> UpstreamConn:
        _, _, host, port, server_name = key
        # One deadline for the whole set-up: TCP, the IP echo, the member's CONNECT answer and the TLS handshake.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        echo = self.verifier.echo_for(member) if self.verifier is not None and member is not None \
            and server_name is not None else None
        unverified: VerifyFailure | None = None
        if echo is not None:
            assert member is not None and self.verifier is not None
            try:  # half the set-up time at most for the question: an echo outage must leave time to connect
                stream, ip = await self.connector.open_verified(host, port, member, deadline=deadline,
                                                                server_name=server_name, echo=echo,
                                                                echo_deadline=loop.time() + self.connect_timeout / 2)
            except VerifyFailure as exc:
                unverified = exc
            else:
                self.verifier.verified(member, ip)
                return UpstreamConn(key, HttpConnection(stream, h11.CLIENT), egress_ip=ip)
        resolver = self.token_resolver if key[0] == "token" else None
        stream = await self.connector.open(host, port, member, deadline=deadline, tls=server_name is not None,
                                           server_name=server_name, addresses=addresses, resolver=resolver)
        if unverified is not None:  # the member works without the question: verification is what failed
            assert member is not None and self.verifier is not None
            self.verifier.failed(member, unverified.reason, unverified.detail)
        return UpstreamConn(key, HttpConnection(stream, h11.CLIENT))
