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
HOP_BY_HOP_BYTES = frozenset(
    {b"connection", b"proxy-connection", b"proxy-authorization", b"keep-alive", b"transfer-encoding", b"te",
     b"upgrade", b"trailer", b"proxy-authenticate"}
)


class ConnectFailure(Exception):
    """The connection could not be set up; no byte of the request was sent."""

    def __init__(self, reason: str, detail: str, member_fault: bool = True, ejects: bool = True) -> None:
        super().__init__(detail)
        self.reason = reason  # one of metrics.FAILURE_REASONS, or "tls"
        self.detail = detail
        self.member_fault = member_fault  # another member might do better: fail over
        self.ejects = ejects  # evidence the member itself is broken (not the target behind it)


class SendFailure(Exception):
    """Failed after request bytes left: the request may have reached Salesforce."""


@dataclass
class Conn:
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
        self._idle: dict[tuple[str | None, str, int], deque[Conn]] = defaultdict(deque)

    async def acquire(self, member: Member | None, host: str, port: int) -> tuple[Conn, bool]:
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

    def release(self, conn: Conn) -> None:
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

    async def _open(self, member: Member | None, host: str, port: int, key: tuple[str | None, str, int]) -> Conn:
        target = member.address.address if member else (host, port)
        where = f"pair member {member.label}" if member else f"{host}:{port}"
        # One deadline for the whole set-up: TCP, the member's CONNECT answer and the TLS handshake.
        deadline = asyncio.get_running_loop().time() + self.connect_timeout
        try:
            async with asyncio.timeout_at(deadline):
                reader, writer = await asyncio.open_connection(*target, limit=MAX_HEAD_BYTES)
        except (OSError, TimeoutError) as exc:
            reason = _classify_oserror(exc)
            raise ConnectFailure(reason, f"cannot connect to {where}: {describe_error(exc)}") from None
        try:
            async with asyncio.timeout_at(deadline):
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
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError) as exc:
            writer.close()
            reason = "timeout" if isinstance(exc, TimeoutError) else "reset"
            raise ConnectFailure(reason, f"setting up the connection via {where} failed: {describe_error(exc)}") from None
        return Conn(key, reader, writer)

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
            # Often about the target (a mistyped My Domain, an origin the member cannot reach), not the
            # member: try another member, but do not eject this one for it (Squid does not blame a parent
            # for an origin's errors either).
            raise ConnectFailure(
                "proxy_error", f"pair member {member.label} answered the CONNECT with {status}", ejects=False
            )


def describe_error(exc: BaseException) -> str:
    """A short, credential-free description of a network error."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "the connection closed early"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text[:200]


def _connection_tokens(headers: http.Headers) -> set[bytes]:
    return {t.strip().lower() for v in headers.get_all("connection") for t in v.encode("latin-1").split(b",")}


def assemble_request(req: http.Request) -> bytes:
    """The request as HTTP/1.1 origin-form bytes, hop-by-hop headers dropped, exact Content-Length.

    Built from the raw bytes mitmproxy parsed, never re-encoded text, so any target the client sent is
    passed on as it was.
    """
    body = req.raw_content or b""
    drop = HOP_BY_HOP_BYTES | _connection_tokens(req.headers) | {b"content-length"}
    out = [req.data.method + b" " + req.data.path + b" HTTP/1.1"]
    if not any(name.lower() == b"host" for name, _ in req.headers.fields):
        out.append(b"Host: " + (req.host_header or req.pretty_host).encode("idna"))
    out += [name + b": " + value for name, value in req.headers.fields if name.lower() not in drop]
    out.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(out) + b"\r\n\r\n" + body


def parse_response_head(head: bytes) -> tuple[bytes, int, bytes, list[tuple[bytes, bytes]]]:
    lines = head[:-4].split(b"\r\n")
    try:
        version, status_s, *reason = lines[0].split(b" ", 2)
        status = int(status_s)
    except ValueError:
        raise SendFailure(f"the server answered with something that is not HTTP: {lines[0][:60]!r}") from None
    if not version.startswith(b"HTTP/1.") or not 100 <= status <= 599:
        raise SendFailure(f"the server answered with something that is not HTTP/1.x: {lines[0][:60]!r}")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name.strip():
            raise SendFailure("malformed response header from the server")
        headers.append((name.strip(), value.strip()))
    return version, status, reason[0] if reason else b"", headers


def _content_length(value: bytes) -> int:
    if not value.isdigit():  # rejects "1, 1", "-5", "12x": ambiguous lengths are not guessed at
        raise SendFailure(f"invalid Content-Length from the server: {value[:40]!r}")
    length = int(value)
    if length > MAX_RESPONSE_BYTES:
        raise SendFailure(f"response too large ({length} bytes > {MAX_RESPONSE_BYTES})")
    return length


async def read_response(reader: asyncio.StreamReader) -> tuple[http.Response, bool]:
    """Read one final HTTP/1.1 response (1xx interim answers are skipped); returns it and whether the
    connection may be reused. Raises SendFailure for anything malformed or over the caps."""
    for _ in range(10):  # bounded: at most this many interim 1xx answers
        head = await reader.readuntil(b"\r\n\r\n")
        version, status, reason, headers = parse_response_head(head)
        if status == 101:
            raise SendFailure("the server switched protocols (101) on a token call")
        if status >= 200:
            break
    else:
        raise SendFailure("too many interim (1xx) answers")
    hmap: dict[bytes, list[bytes]] = {}
    for k, v in headers:
        hmap.setdefault(k.lower(), []).append(v)
    connection = {t.strip().lower() for v in hmap.get(b"connection", []) for t in v.split(b",")}
    keep = b"close" not in connection and version == b"HTTP/1.1"
    chunked = any(b"chunked" in v.lower() for v in hmap.get(b"transfer-encoding", []))
    lengths = set(hmap.get(b"content-length", []))
    if status in (204, 304):
        body = b""
    elif chunked:
        body = await _read_chunked(reader)
    elif lengths:
        if len(lengths) != 1:
            raise SendFailure("conflicting Content-Length headers from the server")
        body = await reader.readexactly(_content_length(lengths.pop()))
    else:  # delimited by the server closing the connection
        body = bytearray()
        while len(body) <= MAX_RESPONSE_BYTES:
            chunk = await reader.read(65536)
            if not chunk:
                break
            body += chunk
        if len(body) > MAX_RESPONSE_BYTES:
            raise SendFailure("response too large")
        body, keep = bytes(body), False
    drop = HOP_BY_HOP_BYTES | connection | {b"content-length"}
    kept = [(k, v) for k, v in headers if k.lower() not in drop]
    kept.append((b"Content-Length", str(len(body)).encode()))
    now = time.time()
    resp = http.Response(
        http_version=b"HTTP/1.1", status_code=status, reason=reason, headers=http.Headers(kept),
        content=body, trailers=None, timestamp_start=now, timestamp_end=now,
    )
    return resp, keep


def chunk_size(line: bytes | None) -> int | None:
    """The size in a chunk-size line (extensions ignored); None unless it is plain hex digits."""
    if line is None:
        return None
    size_s = line.split(b";", 1)[0].strip()
    if not size_s or len(size_s) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size_s):
        return None
    return int(size_s, 16)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    for _ in range(100_000):  # bounded: at most this many chunks
        size = chunk_size(await reader.readuntil(b"\r\n"))
        if size is None:
            raise SendFailure("malformed chunked encoding from the server")
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return bytes(body)
        if len(body) + size > MAX_RESPONSE_BYTES:
            raise SendFailure("response too large")
        body += await reader.readexactly(size)
        await reader.readexactly(2)
    raise SendFailure("too many chunks in the response")


def _after_send(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no response within the deadline"
    if isinstance(exc, (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError)):
        return "the connection closed before a complete response"
    if isinstance(exc, (OSError, ssl.SSLError, asyncio.LimitOverrunError)):
        return describe_error(exc)
    return f"unexpected {type(exc).__name__} while reading the response"


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
            released = False
            try:  # from the first write on, the request may reach Salesforce: never retried
                async with asyncio.timeout(self.response_timeout):
                    conn.writer.write(raw)
                    await conn.writer.drain()
                    response, keep = await read_response(conn.reader)
                if keep:
                    self.pool.release(conn)
                    released = True
                return SendResult(response, member, attempts, sent=True)
            except SendFailure as exc:
                return SendResult(None, member, attempts, sent=True, detail=str(exc))
            except Exception as exc:  # noqa: BLE001 - whatever broke, the bytes may have left
                via = f"via pair member {member.label}" if member else "direct"
                extra = " (on a reused keep-alive connection)" if reused else ""
                return SendResult(None, member, attempts, sent=True, detail=f"{_after_send(exc)} {via}{extra}")
            finally:
                if not released:
                    conn.close()
