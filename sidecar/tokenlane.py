"""The token lane: serve an app's connection to a Salesforce token host without mitmproxy's
per-request machinery.

Why: a token call through mitmproxy's layers costs ~1.9 ms of CPU (client-side TLS in pyOpenSSL,
the HTTP/1 layers, hook dispatch to every addon) while the work the sidecar needs (parse one small
request, choose a member, send it, pass the answer back) takes ~0.2 ms. On a keep-alive connection
that overhead *is* the latency the sidecar adds (bench/RESULTS.md).

What: after the front door has answered a ``CONNECT`` to a token host *name*, the lane terminates
TLS with the standard :mod:`ssl` module, using the leaf certificate mitmproxy's certificate store
issues for that host (the same CA the app already trusts), and reads HTTP/1.1 requests:

- a token call goes to :class:`addons.token_route.TokenRoute`: the same detection, local refusals,
  guard, sender (failover only before a byte left) and record as on the mitmproxy path;
- anything else on that host (REST API calls, userinfo, ...) is forwarded request by request, its
  bodies streamed both ways in bounded chunks, along the route ``SIDECAR_ROUTE`` gives it (direct by
  default), on the same pooled upstream connections.

Only HTTP/1.1 is offered to the client (ALPN), as on the mitmproxy path. Every other connection
(plain HTTP, IP literals, proxy auth, ``SIDECAR_ROUTE=all``) is still served by mitmproxy.

TLS runs on :class:`ssl.SSLObject` with memory BIOs over the raw socket rather than asyncio's SSL
transport, which allocates a 256 KiB read buffer per connection: the lane holds a few KiB per idle
keep-alive connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import ssl
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy import certs, http

from addons.token_route import CLOSE, TokenRoute
from sidecar.frontdoor import closing_response, quickack
from sidecar.logs import event
from sidecar.metrics import Metrics
from sidecar.upstream import (
    HOP_BY_HOP_BYTES,
    MAX_HEAD_BYTES,
    Conn,
    ConnectFailure,
    SendFailure,
    UpstreamPool,
    chunk_size,
    describe_error,
    parse_response_head,
)

if TYPE_CHECKING:
    from sidecar.pair import Member

log = logging.getLogger("egress_sidecar.lane")

MAX_HEAD = MAX_HEAD_BYTES  # request and response heads, trailer sections
MAX_CHUNK_LINE = 4096
CHUNK = 64 * 1024  # per read: a streamed body holds at most about this much per direction
LINGER_SECONDS = 5.0
LINGER_BYTES = 64 * 1024 * 1024  # an upload refused before it was read is drained up to this much
MAX_CONTEXTS = 256  # leaf certificates kept ready (~23 KB each), one per exact token host or pattern
_RETRYABLE = frozenset({"GET", "HEAD", "OPTIONS"})
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ClientClosed(ConnectionError):
    """The client's side of the connection ended."""


# -- certificates ---------------------------------------------------------------------------------
class LeafContexts:
    """Server-side ``ssl.SSLContext`` per certificate name, with the leaf certificate mitmproxy's
    certificate store issues for it, bounded LRU. ``name_for`` maps a host to its certificate name:
    with :meth:`TokenHosts.certificate_name`, every host under ``*.my.salesforce.com`` shares one
    wildcard certificate, so an ISV serving thousands of orgs holds one context, not thousands."""

    def __init__(self, certstore: Callable[[], certs.CertStore], workdir: Path,
                 name_for: Callable[[str], str] = lambda host: host) -> None:
        self._certstore = certstore
        self._workdir = workdir
        self._name_for = name_for
        self._cache: OrderedDict[str, ssl.SSLContext] = OrderedDict()

    def get(self, host: str) -> ssl.SSLContext:
        name = self._name_for(host)
        ctx = self._cache.get(name)
        if ctx is not None:
            self._cache.move_to_end(name)
            return ctx
        entry = self._certstore().get_cert(name, [x509.DNSName(name)])
        pem = entry.cert.to_pem() + b"".join(c.to_pem() for c in entry.chain_certs if c != entry.cert)
        pem += entry.privatekey.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        _load_chain(ctx, pem, self._workdir)
        self._cache[name] = ctx
        if len(self._cache) > MAX_CONTEXTS:
            self._cache.popitem(last=False)
        return ctx


def _load_chain(ctx: ssl.SSLContext, pem: bytes, workdir: Path) -> None:
    """``load_cert_chain`` only reads files: hand it an anonymous in-memory file where the kernel has
    them (Linux memfd), else a private temporary file in the confdir that is removed at once."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("egress-sidecar-leaf", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            return
        except OSError:
            pass  # e.g. no /proc: fall back to a file
        finally:
            os.close(fd)
    fd, name = tempfile.mkstemp(dir=workdir, prefix=".leaf-", suffix=".pem")  # mode 0600
    try:
        os.write(fd, pem)
        os.close(fd)
        ctx.load_cert_chain(name)
    finally:
        os.unlink(name)


# -- TLS over a raw socket ------------------------------------------------------------------------
class TlsStream:
    """Server-side TLS on a non-blocking socket, with a small read buffer for HTTP parsing."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, ctx: ssl.SSLContext,
                 send_timeout: float) -> None:
        self.loop = loop
        self.sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self._in, self._out, server_side=True)
        self.buf = bytearray()
        self.send_timeout = send_timeout  # a client that stops reading is cut after this long
        self._sending = asyncio.Lock()  # reads flush too (key updates): one sender at a time, records in order

    async def _flush(self) -> None:
        async with self._sending:
            data = self._out.read()
            if data:
                async with asyncio.timeout(self.send_timeout):
                    await self.loop.sock_sendall(self.sock, data)

    async def _fill(self) -> bool:
        quickack(self.sock)  # see frontdoor.quickack: a request in two writes must not wait 40 ms
        data = await self.loop.sock_recv(self.sock, CHUNK)
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    async def handshake(self) -> None:
        for _ in range(100):  # bounded: a handshake takes a few round trips
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ClientClosed("the client closed during the TLS handshake") from None
            except ssl.SSLError:
                with contextlib.suppress(OSError):
                    await self._flush()  # the alert tells the client why
                raise
        else:
            raise ssl.SSLError("TLS handshake did not finish")
        await self._flush()  # the last flight, and TLS 1.3 session tickets

    async def read_some(self) -> bytes:
        """Decrypted bytes, buffered ones first; b"" once the client has closed."""
        if self.buf:
            data = bytes(self.buf)
            self.buf.clear()
            return data
        return await self._decrypt()

    async def _decrypt(self) -> bytes:
        """The next decrypted bytes from the socket (never the buffer); b"" once the client has closed."""
        while True:
            try:
                return self.obj.read(CHUNK)
            except ssl.SSLWantReadError:
                await self._flush()  # post-handshake messages (key updates)
                if not await self._fill():
                    return b""
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    async def read_until(self, sep: bytes, limit: int) -> bytes | None:
        """Up to and including ``sep``; None when the client closed before sending anything."""
        start = 0
        while True:
            i = self.buf.find(sep, start)
            if (i + len(sep) if i >= 0 else len(self.buf)) > limit:
                raise BadRequest(431, f"request head larger than {limit} bytes")
            if i >= 0:
                out = bytes(self.buf[: i + len(sep)])
                del self.buf[: i + len(sep)]
                return out
            start = max(0, len(self.buf) - len(sep) + 1)
            data = await self._decrypt()
            if not data:
                if self.buf:
                    raise ClientClosed("the client closed in the middle of a request head")
                return None
            self.buf += data

    async def read_exactly(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            data = await self.read_upto(n - len(out))
            out += data
        return bytes(out)

    async def read_upto(self, n: int) -> bytes:
        """At most ``n`` bytes (at least one); raises ClientClosed at the end of the stream."""
        if not self.buf:
            data = await self._decrypt()
            if not data:
                raise ClientClosed("the client closed in the middle of a request body")
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def write(self, data: bytes) -> None:
        self.obj.write(data)
        await self._flush()


# -- HTTP/1.1 requests ----------------------------------------------------------------------------
def parse_request_head(head: bytes) -> tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]]]:
    """``(method, path, version, headers)`` of a request head ending in CRLF CRLF; raises BadRequest.
    The target may be origin-form (``/path``) or absolute-form (``https://host/path``)."""
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method) or version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadRequest(400, "malformed request line (expected METHOD target HTTP/1.1)")
    if any(b < 0x21 or b == 0x7F for b in target):
        raise BadRequest(400, "control characters in the request target")
    if target.startswith(b"/") or (target == b"*" and method == b"OPTIONS"):
        path = target
    elif target[:8].lower() == b"https://" or target[:7].lower() == b"http://":
        rest = target.split(b"://", 1)[1]
        slash = rest.find(b"/")
        path = rest[slash:] if slash >= 0 else b"/"
    else:
        raise BadRequest(400, "unsupported request target")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise BadRequest(400, "obsolete line folding in the request headers")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise BadRequest(400, "malformed request header line")
        if b"\r" in value or b"\n" in value or b"\0" in value:
            raise BadRequest(400, "control characters in a request header")
        headers.append((name, value.strip(b" \t")))
    return method, path, version, headers


def _values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for k, v in headers if k.lower() == name]


def _tokens(headers: list[tuple[bytes, bytes]], name: bytes) -> set[bytes]:
    return {t.strip().lower() for v in _values(headers, name) for t in v.split(b",") if t.strip()}


def body_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The request body's length, or None for chunked; raises BadRequest for anything ambiguous
    (the classic request-smuggling shapes: both framings, differing lengths, unknown codings)."""
    te = _values(headers, b"transfer-encoding")
    cl = _values(headers, b"content-length")
    if te:
        if cl:
            raise BadRequest(400, "both Transfer-Encoding and Content-Length in one request")
        if [c.strip().lower() for v in te for c in v.split(b",")] != [b"chunked"]:
            raise BadRequest(501, "unsupported Transfer-Encoding (only chunked)")
        return None
    lengths = {c.strip() for v in cl for c in v.split(b",")}
    if not lengths:
        return 0
    if len(lengths) != 1 or not next(iter(lengths)).isdigit():
        raise BadRequest(400, "invalid Content-Length")
    return int(lengths.pop())


def keep_alive(version: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
    return version == b"HTTP/1.1" and b"close" not in _tokens(headers, b"connection")


def response_bytes(resp: http.Response, close: bool) -> bytes:
    """A whole response the sidecar holds in memory (token calls, local answers) as HTTP/1.1 bytes."""
    body = resp.raw_content or b""
    out = [b"HTTP/1.1 %d %s" % (resp.status_code, resp.data.reason or _reason(resp.status_code))]
    skip = (b"connection", b"keep-alive", b"transfer-encoding", b"content-length")
    out += [k + b": " + v for k, v in resp.headers.fields if k.lower() not in skip]
    out.append(b"Content-Length: %d" % len(body))
    if close:
        out.append(b"Connection: close")
    return b"\r\n".join(out) + b"\r\n\r\n" + body


def error_bytes(status: int, message: str) -> bytes:
    return closing_response(status, b"text/plain; charset=utf-8", f"egress-sidecar: {message}\n".encode())


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


class _Upstream502(Exception):
    """Forwarding failed before anything of the response reached the client."""


# -- the lane -------------------------------------------------------------------------------------
class TokenLane:
    def __init__(
        self,
        route: TokenRoute,
        pool: UpstreamPool,
        contexts: LeafContexts,
        metrics: Metrics,
        *,
        idle_timeout: float,
        handshake_timeout: float,
    ) -> None:
        self.route = route
        self.pool = pool
        self.contexts = contexts
        self.metrics = metrics
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout

    async def serve(self, sock: socket.socket, host: str, port: int) -> None:
        """Serve one client connection after its CONNECT was answered; returns when it is done (the
        caller closes the socket)."""
        loop = asyncio.get_running_loop()
        try:
            tls = TlsStream(loop, sock, self.contexts.get(host), send_timeout=self.idle_timeout)
        except (ValueError, OSError, ssl.SSLError) as exc:
            event(log, logging.ERROR, f"cannot issue a certificate for {host}: {describe_error(exc)}")
            return
        try:
            async with asyncio.timeout(self.handshake_timeout):
                await tls.handshake()
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            event(log, logging.WARNING,
                  f"client TLS handshake for {host} failed ({_tls_reason(exc)}); if this is the app, does it "
                  "trust the sidecar's CA (ca.pem, or ca-bundle.pem in its CA bundle variable)?")
            return
        self.metrics.intercepted.inc()
        for _ in range(1_000_000):  # bounded: requests on one keep-alive connection
            try:
                async with asyncio.timeout(self.idle_timeout):
                    head = await tls.read_until(b"\r\n\r\n", MAX_HEAD)
            except BadRequest as exc:
                event(log, logging.INFO, f"refused a malformed request to {host}: {exc.message}")
                await _send_quietly(tls, error_bytes(exc.status, exc.message))
                await _linger(loop, sock)
                return
            if head is None:
                return
            try:
                if not await self._one_request(tls, head, host, port):
                    return
            except BadRequest as exc:
                event(log, logging.INFO, f"refused a malformed request to {host}: {exc.message}")
                await _send_quietly(tls, error_bytes(exc.status, exc.message))
                await _linger(loop, sock)
                return

    async def _one_request(self, tls: TlsStream, head: bytes, host: str, port: int) -> bool:
        """Serve one request; whether the connection stays open for the next one."""
        started = time.time()
        method, path, version, headers = parse_request_head(head)
        length = body_length(headers)
        req = http.Request(host, port, method, b"https", b"", path, version, http.Headers(headers), None, None,
                           started, None)
        call = self.route.detect(req)
        if call is None:
            return await self._forward(tls, req, headers, length)
        refusal = self.route.refusal(req, call)
        if refusal is CLOSE:
            return False
        if isinstance(refusal, http.Response):  # the body is left unread: the connection ends with it
            try:
                await tls.write(response_bytes(refusal, close=True))
                await _linger(tls.loop, tls.sock)
            finally:
                self.route.finish(call, req, refusal)
            return False
        try:
            if "expect" in req.headers:  # as mitmproxy does: answered here, not passed on
                if req.headers["expect"].lower() == "100-continue" and length:
                    await tls.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                del req.headers["expect"]
            async with asyncio.timeout(self.idle_timeout):
                req.data.content = await tls.read_exactly(length or 0)
        except (ClientClosed, OSError, TimeoutError) as exc:
            reason = "it stalled past SIDECAR_IDLE_TIMEOUT" if isinstance(exc, TimeoutError) else describe_error(exc)
            self.route.abandoned(call, req, f"the client left before its request was complete: {reason} "
                                 "(nothing was sent)")
            return False
        req.timestamp_end = time.time()
        resp = await self.route.answer(req, call)
        keep = keep_alive(version, headers)
        try:
            await tls.write(response_bytes(resp, close=not keep))
        except OSError:
            keep = False  # the app left; the call is recorded with what really happened
        finally:
            self.route.finish(call, req, resp)
        return keep

    # -- everything else on a token host: forwarded, streamed -------------------------------------
    async def _forward(self, tls: TlsStream, req: http.Request, headers: list[tuple[bytes, bytes]],
                       length: int | None) -> bool:
        member = self.route.other_member(on_token_host=True)
        upgrade = b"upgrade" in _tokens(headers, b"connection") and bool(_values(headers, b"upgrade"))
        if _tokens(headers, b"expect") == {b"100-continue"} and length != 0:
            await tls.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # as mitmproxy does: we read the body anyway
        try:
            head = _request_head(req, headers, length, upgrade)
        except UnicodeError:
            raise BadRequest(400, "the CONNECT host is not a valid host name") from None
        try:
            conn, response_head = await self._send_request(tls, req, head, member, length)
        except _Upstream502 as exc:
            await _send_quietly(tls, error_bytes(502, str(exc)))
            await _linger(tls.loop, tls.sock)  # the request body may be unread: let the client read the 502
            return False
        try:
            return await self._relay_response(tls, req, headers, conn, response_head, upgrade)
        except _Upstream502 as exc:
            conn.close()
            await _send_quietly(tls, error_bytes(502, str(exc)))
            return False
        except BaseException:
            conn.close()
            raise

    async def _send_request(self, tls: TlsStream, req: http.Request, head: bytes, member: Member | None,
                            length: int | None) -> tuple[Conn, bytes]:
        """Open (or reuse) the upstream connection and send the request; returns it with the response
        head. A reused keep-alive connection the server had closed is replaced once for a GET, HEAD or
        OPTIONS without a body (RFC 9112 9.3.1: a proxy must not resend what may have had an effect)."""
        via = f" via pair member {member.label}" if member else ""
        for attempt in range(2):
            try:
                conn, reused = await self.pool.acquire(member, req.host, req.port)
            except ConnectFailure as exc:
                raise _Upstream502(exc.detail) from None
            try:
                async with asyncio.timeout(self.idle_timeout) as deadline:  # moved on by every chunk sent
                    conn.writer.write(head)
                    await self._send_body(tls, conn, length, deadline)
                    await conn.writer.drain()
                    return conn, await conn.reader.readuntil(b"\r\n\r\n")
            except (ClientClosed, BadRequest):
                conn.close()
                raise
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as exc:
                conn.close()
                if reused and attempt == 0 and req.method in _RETRYABLE and length == 0 \
                        and not isinstance(exc, TimeoutError):
                    continue  # a safe method without a body: resending it cannot do anything twice
                raise _Upstream502(f"{req.host}:{req.port}{via} failed: {describe_error(exc)}") from None
        raise _Upstream502(f"{req.host}:{req.port}{via} closed the connection")  # pragma: no cover

    async def _send_body(self, tls: TlsStream, conn: Conn, length: int | None, deadline: asyncio.Timeout) -> None:
        if length is None:  # chunked: passed on chunk by chunk, trailers dropped
            for _ in range(10_000_000):  # bounded: chunks in one body
                try:
                    line = await tls.read_until(b"\r\n", MAX_CHUNK_LINE)
                except BadRequest:
                    raise BadRequest(400, "malformed chunked request body (chunk line too long)") from None
                size = chunk_size(line)
                if size is None:
                    raise BadRequest(400, "malformed chunked request body")
                if size == 0:  # trailers are dropped; the section is bounded in bytes like a head
                    budget = MAX_HEAD
                    for _ in range(MAX_HEAD):  # bounded: each line costs the budget at least 3 bytes
                        try:
                            line = await tls.read_until(b"\r\n", MAX_CHUNK_LINE)
                        except BadRequest:
                            raise BadRequest(400, "malformed chunked request body (trailer line too long)") from None
                        if line is None:
                            raise ClientClosed("the client closed in the middle of a request body")
                        if line == b"\r\n":
                            conn.writer.write(b"0\r\n\r\n")
                            return
                        budget -= len(line)
                        if budget < 0:
                            break
                    raise BadRequest(400, f"chunked request trailers larger than {MAX_HEAD} bytes")
                conn.writer.write(b"%x\r\n" % size)
                await self._copy_from_client(tls, conn, size, deadline)
                if await tls.read_exactly(2) != b"\r\n":
                    raise BadRequest(400, "malformed chunked request body")
                conn.writer.write(b"\r\n")
            raise BadRequest(400, "too many chunks in the request body")
        await self._copy_from_client(tls, conn, length, deadline)

    async def _copy_from_client(self, tls: TlsStream, conn: Conn, n: int, deadline: asyncio.Timeout) -> None:
        while n > 0:
            try:
                data = await tls.read_upto(min(n, CHUNK))
            except (OSError, ssl.SSLError) as exc:
                if isinstance(exc, ClientClosed):
                    raise
                raise ClientClosed(f"the client's connection failed mid-body: {describe_error(exc)}") from None
            n -= len(data)
            conn.writer.write(data)
            await conn.writer.drain()
            self._extend(deadline)

    async def _relay_response(self, tls: TlsStream, req: http.Request, req_headers: list[tuple[bytes, bytes]],
                              conn: Conn, head: bytes, upgrade: bool) -> bool:
        for _ in range(10):  # bounded: interim answers
            try:
                version, status, reason, headers = parse_response_head(head)
            except SendFailure as exc:
                raise _Upstream502(f"{req.host} answered: {exc}") from None
            if status == 101 and upgrade:
                await tls.write(head)
                await self._pipe_upgraded(tls, conn)
                conn.close()
                return False
            if status >= 200 or status == 101:
                break
            async with asyncio.timeout(self.idle_timeout):
                head = await conn.reader.readuntil(b"\r\n\r\n")
        if status < 200:
            raise _Upstream502(f"{req.host} sent an unexpected {status} answer")
        keep_client = keep_alive(req.data.http_version, req_headers)
        keep_server = keep_alive(version, headers)
        no_body = req.method == "HEAD" or status in (204, 304)
        te = [c.strip().lower() for v in _values(headers, b"transfer-encoding") for c in v.split(b",")]
        chunked = not no_body and bool(te)
        if chunked and te != [b"chunked"]:
            raise _Upstream502(f"{req.host} answered with an unsupported Transfer-Encoding")
        length: int | None = None
        drop = HOP_BY_HOP_BYTES | _tokens(headers, b"connection")
        if not no_body:  # a HEAD answer's Content-Length describes the GET: passed on as it is
            drop = drop | {b"content-length"}
        if not no_body and not chunked:
            lengths = {c.strip() for v in _values(headers, b"content-length") for c in v.split(b",")}
            if len(lengths) > 1 or (lengths and not next(iter(lengths)).isdigit()):
                raise _Upstream502(f"{req.host} answered with an invalid Content-Length")
            length = int(lengths.pop()) if lengths else None
            if length is None:  # delimited by the server closing: so is the client's copy
                keep_client = keep_server = False
        out = [b"HTTP/1.1 %d %s" % (status, reason)]
        out += [k + b": " + v for k, v in headers if k.lower() not in drop]
        if chunked:
            out.append(b"Transfer-Encoding: chunked")
        elif length is not None:
            out.append(b"Content-Length: %d" % length)
        if not keep_client:
            out.append(b"Connection: close")
        response_head = b"\r\n".join(out) + b"\r\n\r\n"
        if length is not None and length <= CHUNK:  # the common small answer: one TLS record, one send
            try:
                async with asyncio.timeout(self.idle_timeout):
                    body = await conn.reader.readexactly(length)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                raise _Upstream502(f"{req.host} closed before its answer was complete ({describe_error(exc)})") from None
            await tls.write(response_head + body)
            if keep_server:
                self.pool.release(conn)
            else:
                conn.close()
            return keep_client
        await tls.write(response_head)
        # From here on the client has part of the answer: a failure can only cut the connection.
        try:
            async with asyncio.timeout(self.idle_timeout) as deadline:
                if chunked:
                    await self._relay_chunked(tls, conn, deadline)
                elif no_body:
                    pass
                elif length is not None:
                    await self._relay_exactly(tls, conn, length, deadline)
                else:
                    await self._relay_until_close(tls, conn, deadline)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, SendFailure):
            conn.close()
            return False
        if keep_server:
            self.pool.release(conn)
        else:
            conn.close()
        return keep_client

    def _extend(self, deadline: asyncio.Timeout) -> None:
        deadline.reschedule(asyncio.get_running_loop().time() + self.idle_timeout)

    async def _relay_exactly(self, tls: TlsStream, conn: Conn, n: int, deadline: asyncio.Timeout) -> None:
        while n > 0:
            data = await conn.reader.read(min(n, CHUNK))
            if not data:
                raise asyncio.IncompleteReadError(b"", n)
            n -= len(data)
            await tls.write(data)
            self._extend(deadline)

    async def _relay_until_close(self, tls: TlsStream, conn: Conn, deadline: asyncio.Timeout) -> None:
        while data := await conn.reader.read(CHUNK):
            await tls.write(data)
            self._extend(deadline)

    async def _relay_chunked(self, tls: TlsStream, conn: Conn, deadline: asyncio.Timeout) -> None:
        for _ in range(10_000_000):  # bounded: chunks in one body
            size = chunk_size(await conn.reader.readuntil(b"\r\n"))
            if size is None:
                raise SendFailure("malformed chunked encoding from the server")
            if size == 0:  # trailers, dropped; the section is bounded in bytes like a head
                budget = MAX_HEAD
                for _ in range(MAX_HEAD):  # bounded: each line costs the budget at least 3 bytes
                    line = await conn.reader.readuntil(b"\r\n")
                    if line == b"\r\n":
                        await tls.write(b"0\r\n\r\n")
                        return
                    budget -= len(line)
                    if budget < 0:
                        break
                raise SendFailure(f"response trailers larger than {MAX_HEAD} bytes")
            await tls.write(b"%x\r\n" % size)
            await self._relay_exactly(tls, conn, size, deadline)
            if await conn.reader.readexactly(2) != b"\r\n":
                raise SendFailure("malformed chunked encoding from the server")
            await tls.write(b"\r\n")
        raise SendFailure("too many chunks in the response")

    async def _pipe_upgraded(self, tls: TlsStream, conn: Conn) -> None:
        """After a 101 (WebSocket and the like): bytes both ways until the server's side ends, or
        nothing has moved either way for ``SIDECAR_IDLE_TIMEOUT`` (one clock for both directions, so a
        push-only server is not cut while it talks). A client that half-closes still gets the rest."""
        loop = asyncio.get_running_loop()
        last = [loop.time()]

        async def up() -> None:
            while data := await tls.read_some():
                last[0] = loop.time()
                conn.writer.write(data)
                await conn.writer.drain()
                last[0] = loop.time()

        async def down() -> None:
            while data := await conn.reader.read(CHUNK):
                last[0] = loop.time()
                await tls.write(data)
                last[0] = loop.time()

        upward, downward = asyncio.create_task(up()), asyncio.create_task(down())
        try:
            for _ in range(10_000_000):  # bounded: one wake-up per idle check
                await asyncio.wait([downward], timeout=min(self.idle_timeout, 30.0))
                if downward.done() or (upward.done() and upward.exception() is not None):
                    break
                if loop.time() - last[0] > self.idle_timeout:
                    break
        finally:
            for t in (upward, downward):
                t.cancel()
            await asyncio.gather(upward, downward, return_exceptions=True)


def _request_head(req: http.Request, headers: list[tuple[bytes, bytes]], length: int | None, upgrade: bool) -> bytes:
    """The request for the server: origin-form, hop-by-hop headers dropped, framing restated."""
    drop = HOP_BY_HOP_BYTES | _tokens(headers, b"connection") | {b"content-length", b"expect"}
    out = [req.data.method + b" " + req.data.path + b" HTTP/1.1"]
    if not _values(headers, b"host"):
        out.append(b"Host: " + req.host.encode("idna") + (b":%d" % req.port if req.port != 443 else b""))
    out += [k + b": " + v for k, v in headers if k.lower() not in drop]
    if upgrade:
        out += [b"Connection: Upgrade"] + [b"Upgrade: " + v for v in _values(headers, b"upgrade")]
    if length is None:
        out.append(b"Transfer-Encoding: chunked")
    elif length or req.method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        out.append(b"Content-Length: %d" % length)
    return b"\r\n".join(out) + b"\r\n\r\n"


def _tls_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return (exc.reason or str(exc)).lower().replace("_", " ")[:120]
    return describe_error(exc)


async def _linger(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Close after an answer sent before the request was read to its end: stop sending, then read and
    drop what the client still sends (bounded), so the kernel does not answer it with a reset that
    can destroy the answer before the client has read it (what HTTP servers call a lingering close)."""
    with contextlib.suppress(OSError):  # TimeoutError included: the caller closes the socket next
        sock.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(LINGER_SECONDS):
            for _ in range(LINGER_BYTES // CHUNK):  # bounded in reads, bytes and time
                if not await loop.sock_recv(sock, CHUNK):
                    return


async def _send_quietly(tls: TlsStream, data: bytes) -> None:
    with contextlib.suppress(OSError, ssl.SSLError):
        await tls.write(data)
