"""Send one token call: through a pair member or direct, with deadlines, failing over only while
nothing has been sent.

Why the sidecar sends token calls itself instead of leaving it to an engine's connection layer: under
refresh token rotation a request that may have reached Salesforce must never be sent twice, so the
sender has to know exactly whether any byte of the request has left. Everything before that point (TCP
connect to the member, its CONNECT answer, the TLS handshake with Salesforce) can fail over to another
eligible member; anything after it is answered with a clear 502 and never retried.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import h11

from sidecar.egress.pair import Member
from sidecar.net.http1 import end_to_end, h11_message, has, request_event
from sidecar.net.upstream import (
    ConnectFailure,
    NoAcceptableEgress,
    SendFailure,
    UpstreamPool,
    describe_error,
    read_answer,
)
from sidecar.token.messages import Answer, TokenRequest, origin_target


@dataclass
class Attempt:
    member: Member | None
    failure: ConnectFailure | None = None


@dataclass
class SendResult:
    answer: Answer | None
    member: Member | None
    attempts: list[Attempt]
    sent: bool  # whether request bytes left (only meaningful when answer is None)
    detail: str | None = None
    egress_ip: str | None = None  # of the connection it went on, when verified on it
    egress_refused: bool = False  # nothing sent: no connection left from an egress IP the call may use
    conn_id: int | None = None  # the connection it went on (UpstreamConn.id)

Accept = Callable[[Member, str | None], bool]


class Unsendable(Exception):
    """The request cannot be written as valid HTTP/1.1 (nothing was sent)."""


def request_events(req: TokenRequest) -> tuple[h11.Event, ...]:
    """The request for Salesforce: origin-form, hop-by-hop headers dropped, an exact Content-Length (a
    chunked request from the app is sent on with its length, read whole). Raises Unsendable."""
    headers = end_to_end(req.headers, drop=(b"content-length", b"expect"))
    parsed = req.parsed  # the app's headers, read (and checked) by h11, and a length of our own
    if not has(headers, b"host"):  # (HTTP/1.0) the name the app connected to, checked as any header
        host = req.host.encode("idna") + (b":%d" % req.port if req.port != 443 else b"")
        headers.insert(0, (b"Host", host))
        parsed = False
    headers.append((b"Content-Length", b"%d" % len(req.body)))
    try:
        head = request_event(req.method.encode(), origin_target(req.target), headers, parsed=parsed)
    except h11.LocalProtocolError as exc:
        raise Unsendable(h11_message(exc)) from None
    except UnicodeError:
        raise Unsendable("the request target is not ASCII") from None
    return head, h11.Data(data=req.body), h11.EndOfMessage()


def _after_send(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no response within the deadline"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionError)):
        return "the connection closed before a complete response"
    if isinstance(exc, (OSError, ssl.SSLError)):
        return describe_error(exc)
    return f"unexpected {type(exc).__name__} while reading the response"


class TokenSender:
    """Sends a token call, failing over across members while nothing has been sent."""

    def __init__(
        self,
        pool: UpstreamPool,
        response_timeout: float,
        on_connect_failure: Callable[[Member, ConnectFailure], None],
        on_connect_success: Callable[[Member], None],
    ) -> None:
        self.pool = pool
        self.response_timeout = response_timeout
        self.on_connect_failure = on_connect_failure
        self.on_connect_success = on_connect_success

    async def send(
        self, req: TokenRequest, first: Member | None, next_member: Callable[[list[Member]], Member | None],
        accept: Accept | None = None, avoid: int | None = None,
    ) -> SendResult:
        """Send through ``first``, failing over to ``next_member(tried)`` while nothing has left. ``accept``:
        whether the call may leave through a connection of this member with this egress IP (verified on
        it; None: unverified). ``avoid``: a connection not to use (the one a refused attempt went on)."""
        attempts: list[Attempt] = []
        refused_egress = False
        member = first
        events = request_events(req)  # built (and validated) before anything is sent: Unsendable
        host, port = req.destination
        for _ in range(64):  # bounded: one attempt per member at most
            attempt = Attempt(member)
            attempts.append(attempt)
            on = member
            try:
                conn, reused = await self.pool.acquire(
                    member, host, port, req.host, purpose="token", owner=req.owner, avoid=avoid,
                    accept=(lambda ip: accept(on, ip)) if accept is not None and on is not None else None)
            except ConnectFailure as failure:
                attempt.failure = failure
                refused_egress = isinstance(failure, NoAcceptableEgress)
                if member is not None and failure.member_fault and not refused_egress:
                    self.on_connect_failure(member, failure)
                tried = [a.member for a in attempts if a.member is not None]
                nxt = next_member(tried) if member is not None and failure.member_fault else None
                if nxt is None:
                    return SendResult(None, member, attempts, sent=False, detail=failure.detail,
                                      egress_refused=refused_egress)
                member = nxt
                continue
            if member is not None:
                self.on_connect_success(member)
            try:  # from the first write on, the request may reach Salesforce: never retried
                deadline = asyncio.get_running_loop().time() + self.response_timeout  # one, for send and answer
                await conn.http.send(*events, deadline=deadline)
                answer = await read_answer(conn.http, b"POST", deadline=deadline)
            except SendFailure as exc:
                conn.close()
                return SendResult(None, member, attempts, sent=True, detail=str(exc), egress_ip=conn.egress_ip)
            except Exception as exc:  # noqa: BLE001 - whatever broke, the bytes may have left
                conn.close()
                via = f"via pair member {member.label}" if member else "direct"
                extra = " (on a reused keep-alive connection)" if reused else ""
                return SendResult(None, member, attempts, sent=True, detail=f"{_after_send(exc)} {via}{extra}",
                                  egress_ip=conn.egress_ip)
            except BaseException:
                conn.close()
                raise
            egress_ip = conn.egress_ip
            self.pool.release(conn, req.owner)
            return SendResult(answer, member, attempts, sent=True, egress_ip=egress_ip, conn_id=conn.id)
        return SendResult(None, member, attempts, sent=False, detail="too many members tried")
