"""Send one token call: through a pair member (CONNECT + TLS) or direct, with deadlines and failover.

Why the sidecar sends token calls itself instead of leaving it to mitmproxy's connection layer:
under refresh token rotation a request that may have reached Salesforce must never be sent twice,
so the sender has to know exactly whether any byte of the request has left. Everything before
that point (TCP connect to the member, its CONNECT answer, the TLS handshake with Salesforce) can
fail over to another eligible member; anything after it is answered with a clear 502 and never
retried. Connections are kept alive per (member, host, port) and reused, because a new upstream
connection and TLS session per call costs far more than the call itself.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from mitmproxy import http

from sidecar.config import Upstream
from sidecar.pair import Member

log = logging.getLogger("egress_sidecar.upstream")

MAX_RESPONSE_BYTES = 1024 * 1024  # a token response is ~2 KB; 1 MiB is generous and bounded
MAX_HEAD_BYTES = 64 * 1024
POOL_IDLE_SECONDS = 20.0  # below common server keep-alive timeouts, so we rarely write into a closed socket
POOL_MAX_PER_KEY = 16
HOP_BY_HOP = frozenset(
    {"connection", "proxy-connection", "proxy-authorization", "keep-alive", "transfer-encoding", "te", "upgrade",
     "trailer", "proxy-authenticate"}
)


class ConnectFailure(Exception):
    """The connection could not be set up; no byte of the request was sent."""

    def __init__(self, reason: str, detail: str, member_fault: bool = True) -> None:
        super().__init__(detail)
        self.reason = reason  # one of metrics.FAILURE_REASONS, or "tls"
        self.detail = detail
        self.member_fault = member_fault


class SendFailure(Exception):
    """Failed after request bytes left: the request may have reached Salesforce."""


@dataclass
class _Conn:
    key: tuple[str | None, str, int]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    last_used: float = field(default_factory=time.monotonic)

    def usable(self, now: float) -> bool:
        return (
            not self.reader.at_eof()
            and not self.writer.is_closing()
            and now - self.last_used < POOL_IDLE_SECONDS
        )

    def close(self) -> None:
        self.writer.close()


def _classify_oserror(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError)):
        return "reset"
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED,):
        return "refused"
    return "unreachable"


class UpstreamPool:
    """Keep-alive connections per (member, host, port); ``member`` None means direct."""

    def __init__(self, upstream: Upstream | None, ssl_context: ssl.SSLContext, connect_timeout: float) -> None:
        self.upstream = upstream
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str | None, str, int], deque[_Conn]] = defaultdict(deque)

    async def acquire(self, member: Member | None, host: str, port: int) -> tuple[_Conn, bool]:
        """A connection ready for a request, and whether it was reused. Raises ConnectFailure."""
        key = (member.label if member else None, host, port)
        idle = self._idle[key]
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.usable(now):
                return conn, True
            conn.close()
        return await self._open(member, host, port, key), False

    def release(self, conn: _Conn) -> None:
        idle = self._idle[conn.key]
        conn.last_used = time.monotonic()
        if len(idle) >= POOL_MAX_PER_KEY:
            conn.close()
        else:
            idle.append(conn)

    def close_all(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop().close()

    async def _open(self, member: Member | None, host: str, port: int, key: tuple[str | None, str, int]) -> _Conn:
        target = member.address.address if member else (host, port)
        where = f"pair member {member.label}" if member else f"{host}:{port}"
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(*target, limit=MAX_HEAD_BYTES)
        except (OSError, TimeoutError) as exc:
            reason = _classify_oserror(exc)
            raise ConnectFailure(reason, f"cannot connect to {where}: {describe_error(exc)}") from None
        try:
            async with asyncio.timeout(self.connect_timeout):
                if member is not None:
                    await self._connect_tunnel(reader, writer, member, host, port)
                await writer.start_tls(self.ssl_context, server_hostname=host)
        except ConnectFailure:
            writer.close()
            raise
        except ssl.SSLCertVerificationError as exc:
            writer.close()
            raise ConnectFailure(
                "tls", f"TLS verification of {host} failed ({exc.verify_message}); set SIDECAR_UPSTREAM_CA "
                "if a corporate CA re-signs it", member_fault=False) from None
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            writer.close()
            reason = "timeout" if isinstance(exc, TimeoutError) else "reset"
            raise ConnectFailure(reason, f"setting up the connection via {where} failed: {describe_error(exc)}") from None
        return _Conn(key, reader, writer)

    async def _connect_tunnel(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, member: Member, host: str, port: int
    ) -> None:
        assert self.upstream is not None
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        writer.write(
            f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
            f"Proxy-Authorization: {self.upstream.proxy_authorization.decode()}\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        try:
            status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            raise ConnectFailure("proxy_error", f"pair member {member.label} answered the CONNECT with garbage") from None
        if status == 407:
            raise ConnectFailure(
                "auth_failed",
                f"pair member {member.label} refused the proxy credentials (407): check QUOTAGUARDSTATIC_URL",
            )
        if not 200 <= status < 300:
            raise ConnectFailure("proxy_error", f"pair member {member.label} answered the CONNECT with {status}")


def describe_error(exc: BaseException) -> str:
    """A short, credential-free description of a network error."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text[:200]


def assemble_request(req: http.Request) -> bytes:
    """The request as HTTP/1.1 origin-form bytes, hop-by-hop headers dropped, exact Content-Length."""
    body = req.raw_content or b""
    lines = [f"{req.method} {req.path} HTTP/1.1"]
    has_host = False
    for name, value in req.headers.fields:
        lname = name.decode("latin-1").lower()
        if lname in HOP_BY_HOP or lname == "content-length":
            continue
        has_host = has_host or lname == "host"
        lines.append(f"{name.decode('latin-1')}: {value.decode('latin-1')}")
    if not has_host:
        lines.insert(1, f"Host: {req.host_header or req.pretty_host}")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def read_response(reader: asyncio.StreamReader) -> tuple[http.Response, bool]:
    """Read one HTTP/1.1 response; returns it and whether the connection may be reused."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    try:
        version, status_s, *reason = lines[0].split(b" ", 2)
        status = int(status_s)
    except ValueError:
        raise SendFailure(f"Salesforce answered with something that is not HTTP: {lines[0][:60]!r}") from None
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise SendFailure("malformed response header from Salesforce")
        headers.append((name.strip(), value.strip()))
    hmap = {k.lower(): v for k, v in headers}
    keep = hmap.get(b"connection", b"").lower() != b"close" and version == b"HTTP/1.1"
    if status in (204, 304) or 100 <= status < 200:
        body = b""
    elif b"chunked" in hmap.get(b"transfer-encoding", b"").lower():
        body = await _read_chunked(reader)
    elif b"content-length" in hmap:
        length = int(hmap[b"content-length"])
        if length > MAX_RESPONSE_BYTES:
            raise SendFailure(f"token response too large ({length} bytes > {MAX_RESPONSE_BYTES})")
        body = await reader.readexactly(length)
    else:
        body = await reader.read(MAX_RESPONSE_BYTES + 1)
        keep = False
        if len(body) > MAX_RESPONSE_BYTES:
            raise SendFailure("token response too large")
    kept = [(k, v) for k, v in headers if k.lower() not in (b"transfer-encoding", b"content-length", b"connection")]
    kept.append((b"Content-Length", str(len(body)).encode()))
    resp = http.Response(
        http_version=b"HTTP/1.1",
        status_code=status,
        reason=reason[0] if reason else b"",
        headers=http.Headers(kept),
        content=body,
        trailers=None,
        timestamp_start=time.time(),
        timestamp_end=time.time(),
    )
    return resp, keep


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    for _ in range(100_000):  # bounded: at most this many chunks
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise SendFailure("malformed chunked encoding from Salesforce") from None
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return bytes(body)
        if len(body) + size > MAX_RESPONSE_BYTES:
            raise SendFailure("token response too large")
        body += await reader.readexactly(size)
        await reader.readexactly(2)
    raise SendFailure("too many chunks in the token response")


@dataclass
class Attempt:
    member: Member | None
    failure: ConnectFailure | None = None


@dataclass
class SendResult:
    response: http.Response | None
    member: Member | None
    attempts: list[Attempt]
    sent: bool  # whether request bytes left (only meaningful when response is None)
    detail: str | None = None


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
        self, req: http.Request, first: Member | None, next_member: Callable[[list[Member]], Member | None]
    ) -> SendResult:
        attempts: list[Attempt] = []
        member = first
        raw = assemble_request(req)
        while True:
            attempt = Attempt(member)
            attempts.append(attempt)
            try:
                conn, reused = await self.pool.acquire(member, req.host, req.port)
            except ConnectFailure as failure:
                attempt.failure = failure
                if member is not None and failure.member_fault:
                    self.on_connect_failure(member, failure)
                tried = [a.member for a in attempts if a.member is not None]
                nxt = next_member(tried) if member is not None and failure.member_fault else None
                if nxt is None:
                    return SendResult(None, member, attempts, sent=False, detail=failure.detail)
                member = nxt
                continue
            if member is not None:
                self.on_connect_success(member)
            try:
                conn.writer.write(raw)  # from here on, the request may reach Salesforce
                await conn.writer.drain()
                async with asyncio.timeout(self.response_timeout):
                    response, keep = await read_response(conn.reader)
            except SendFailure as exc:
                conn.close()
                return SendResult(None, member, attempts, sent=True, detail=str(exc))
            except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError) as exc:
                conn.close()
                what = "no response within the deadline" if isinstance(exc, TimeoutError) else (
                    "the connection closed before a complete response" if isinstance(
                        exc, (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError)) else describe_error(exc))
                via = f"via pair member {member.label}" if member else "direct"
                extra = " (on a reused keep-alive connection)" if reused else ""
                return SendResult(None, member, attempts, sent=True, detail=f"{what} {via}{extra}")
            if keep:
                self.pool.release(conn)
            else:
                conn.close()
            return SendResult(response, member, attempts, sent=True)
