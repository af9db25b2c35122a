"""Everything on a token host that is not a token call (REST API calls, userinfo, ...): forwarded
request by request, bodies streamed both ways in bounded chunks, along the route ``SIDECAR_ROUTE``
gives it (direct by default), on the pooled upstream connections token calls use too.

``Expect: 100-continue`` is answered here (as mitmproxy does); WebSocket-style upgrades (``101``) are
passed through and then relayed as raw bytes; trailers are dropped. A kept-alive upstream connection
the server closed behind the sidecar's back is replaced once for a ``GET``, ``HEAD`` or ``OPTIONS``
without a body (RFC 9112 9.3.1: a proxy must not resend what may have had an effect).
"""

from __future__ import annotations

import asyncio

import h11

from sidecar.egress.pair import Member
from sidecar.net.http1 import (
    CONTINUE,
    HttpConnection,
    ProtocolError,
    end_to_end,
    has,
    raw_headers,
    request_event,
    response_event,
    tokens,
    values,
)
from sidecar.net.pipe import pipe
from sidecar.net.streams import PeerClosed
from sidecar.net.upstream import (
    MAX_INTERIM,
    Addresses,
    ConnectFailure,
    Owner,
    SendFailure,
    UpstreamConn,
    UpstreamPool,
    describe_error,
)
from sidecar.token.messages import origin_target

_RETRYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS"})
MAX_CHUNKS = 10_000_000  # bounded: Data events in one body (each carries at least one byte)


class Upstream502(Exception):
    """Forwarding failed before anything of the response reached the client."""


class Refused(Exception):
    """The destination rules refuse the request's destination (sidecar.proxy.destinations): a 403."""


class ClientGone(Exception):
    """The client left (or its connection failed) in the middle of its request."""


class Forwarder:
    def __init__(self, pool: UpstreamPool, idle_timeout: float) -> None:
        self.pool = pool
        self.idle_timeout = idle_timeout

    def _extend(self, deadline: asyncio.Timeout) -> None:
        deadline.reschedule(asyncio.get_running_loop().time() + self.idle_timeout)

    async def forward(self, client: HttpConnection, req: h11.Request, host: str, port: int,
                      member: Member | None, address: tuple[str, int] | None = None, *, tls: bool = True,
                      addresses: Addresses | None = None, owner: Owner = None) -> bool:
        """Forward one request whose head was read from ``client``; True when the exchange completed
        (the connection may serve another), False when it must close. Raises Upstream502 while the
        client has seen nothing of an answer, ProtocolError / ClientGone for the client's faults.
        ``address``: where to connect when not ``(host, port)`` (an IP-literal CONNECT; ``host`` is the SNI);
        ``tls``: whether the server speaks TLS (False for a plain ``http://`` proxy request); ``addresses``:
        the addresses a direct connection may go to, approved by the destination rules; ``owner``: the client
        connection (only its requests reuse an upstream connection, UpstreamPool)."""
        upgrade = b"upgrade" in tokens(req.headers, b"connection") and has(req.headers, b"upgrade")
        head = self._upstream_head(req, host, port, upgrade, 443 if tls else 80)
        bodyless = not has(req.headers, b"transfer-encoding") and values(req.headers, b"content-length") in ([], [b"0"])
        if client.expects_continue:
            await client.send(CONTINUE)
        if bodyless:
            try:
                end = await client.next_event()
            except PeerClosed:
                raise ClientGone("the client closed in the middle of a request") from None
            if not isinstance(end, h11.EndOfMessage):
                raise ProtocolError(400, "unexpected data after a request without a body")
        where = f"{host}:{port}" + (f" via pair member {member.label}" if member else "")
        for attempt in range(2 if bodyless and req.method in _RETRYABLE else 1):
            try:
                conn, reused = await self.pool.acquire(member, *(address or (host, port)), host, tls=tls,
                                                       addresses=addresses, owner=owner)
            except ConnectFailure as exc:
                raise (Refused if exc.refused else Upstream502)(exc.detail) from None
            try:
                async with asyncio.timeout(self.idle_timeout) as deadline:  # moved on by every chunk sent
                    await conn.http.send(head)
                    if bodyless:
                        await conn.http.send(h11.EndOfMessage())
                    else:
                        await self._send_body(client, conn, deadline)
                    try:
                        first = await conn.http.next_event()
                    except ProtocolError as exc:
                        raise SendFailure(f"{where} answered: {exc.message}") from None
            except (ClientGone, ProtocolError):  # the client's fault: the caller answers it
                conn.close()
                raise
            except SendFailure as exc:
                conn.close()
                raise Upstream502(str(exc)) from None
            except (OSError, TimeoutError, h11.LocalProtocolError) as exc:
                conn.close()
                if reused and attempt == 0 and bodyless and not isinstance(exc, TimeoutError):
                    continue  # a safe method without a body: resending it cannot do anything twice
                raise Upstream502(f"{where} failed: {describe_error(exc)}") from None
            try:
                return await self._relay_response(client, conn, first, upgrade, where, owner)
            except BaseException:
                conn.close()
                raise
        raise Upstream502(f"{where} closed the connection")  # pragma: no cover - the loop returns

    @staticmethod
    def _upstream_head(req: h11.Request, host: str, port: int, upgrade: bool, default_port: int) -> h11.Request:
        """The request for the server: origin-form, hop-by-hop headers dropped, framing restated."""
        raw = raw_headers(req)
        headers = end_to_end(raw, drop=(b"expect",))
        parsed = True  # the client's headers as h11 read them, and fixed ones of ours
        if not has(headers, b"host"):
            headers.insert(0, (b"Host", host.encode("idna") + (b":%d" % port if port != default_port else b"")))
            parsed = False
        if has(raw, b"transfer-encoding"):
            headers.append((b"Transfer-Encoding", b"chunked"))
        if upgrade:
            headers += [(b"Connection", b"Upgrade")] + [(b"Upgrade", v) for v in values(raw, b"upgrade")]
        return request_event(req.method, origin_target(req.target), headers, parsed=parsed)

    async def _send_body(self, client: HttpConnection, conn: UpstreamConn, deadline: asyncio.Timeout) -> None:
        for _ in range(MAX_CHUNKS):
            try:
                event = await client.next_event()
            except PeerClosed:
                raise ClientGone("the client closed in the middle of a request body") from None
            except OSError as exc:
                raise ClientGone(f"the client's connection failed mid-body: {describe_error(exc)}") from None
            if isinstance(event, h11.Data):
                await conn.http.send(event)
                self._extend(deadline)
            elif isinstance(event, h11.EndOfMessage):
                await conn.http.send(h11.EndOfMessage())  # trailers are dropped
                return
            else:
                raise ClientGone("the client closed in the middle of a request body")
        raise ProtocolError(400, "too many chunks in the request body")

    async def _relay_response(self, client: HttpConnection, conn: UpstreamConn, event: h11.Event, upgrade: bool,
                              where: str, owner: Owner) -> bool:
        try:
            for _ in range(MAX_INTERIM):
                if not isinstance(event, h11.InformationalResponse):
                    break
                if event.status_code == 101 and upgrade:
                    await client.send(h11.InformationalResponse(
                        status_code=101, reason=event.reason, headers=[
                            *end_to_end(raw_headers(event)), (b"Connection", b"Upgrade"),
                            *[(b"Upgrade", v) for v in values(event.headers, b"upgrade")]]))
                    # Bytes both ways until the server's side ends (a client that half-closes still gets the
                    # rest), or nothing has moved either way for SIDECAR_IDLE_TIMEOUT.
                    await pipe(client.stream, conn.stream, self.idle_timeout, client.leftover,
                               conn.http.leftover, until_b_ends=True)
                    conn.close()
                    return False
                if event.status_code != 100:  # 100 was answered to the client already
                    await client.send(h11.InformationalResponse(
                        status_code=event.status_code, reason=event.reason, headers=end_to_end(raw_headers(event))))
                event = await self._upstream_event(conn, where)
        except SendFailure as exc:
            raise Upstream502(str(exc)) from None
        if not isinstance(event, h11.Response):
            raise Upstream502(f"{where} sent no final answer")
        pending: list[h11.Event] = [response_event(event.status_code, bytes(event.reason),
                                                   end_to_end(raw_headers(event)), parsed=True)]
        answered = False  # whether any byte of the answer went to the client
        try:
            async with asyncio.timeout(self.idle_timeout) as deadline:
                for _ in range(MAX_CHUNKS):
                    # What is already in memory goes out with what came before it (a small answer: one
                    # TLS record, one send); before waiting on the network, everything pending is sent.
                    event = conn.http.buffered_event()
                    if event is None:
                        if pending:
                            await client.send(*pending)
                            pending, answered = [], True
                        event = await self._upstream_event(conn, where)
                    if isinstance(event, h11.Data):
                        pending.append(event)
                    elif isinstance(event, h11.EndOfMessage):
                        await client.send(*pending, h11.EndOfMessage())  # trailers are dropped
                        break
                    else:
                        raise SendFailure(f"{where} closed before its answer was complete")
                    self._extend(deadline)
        except (SendFailure, TimeoutError) as exc:
            if not answered:
                raise Upstream502(str(exc) or f"{where} did not finish its answer in time") from None
            conn.close()
            return False  # the client has part of the answer: a failure can only cut the connection
        except (OSError, h11.LocalProtocolError):
            conn.close()  # the client left, or the server's answer did not match its own framing
            return False
        self.pool.release(conn, owner)
        return True

    async def _upstream_event(self, conn: UpstreamConn, where: str) -> h11.Event:
        try:
            async with asyncio.timeout(self.idle_timeout):
                return await conn.http.next_event()
        except ProtocolError as exc:
            raise SendFailure(f"{where} answered: {exc.message}") from None
        except (OSError, TimeoutError) as exc:
            raise SendFailure(f"{where} closed before its answer was complete ({describe_error(exc)})") from None
