"""Byte streams over non-blocking sockets: plain TCP and TLS, for every connection the sidecar serves
or opens.

TLS runs on :class:`ssl.SSLObject` with memory BIOs over the raw socket, not on asyncio's SSL transport:
that transport reads ahead into a 256 KiB buffer per connection, while a token host's keep-alive
connection here holds a few KiB; and because nothing is read ahead (only, when asked, what has already
arrived), :meth:`readable_now` can tell exactly whether a peer sent data nobody asked for (a pooled
connection with such data is never reused), TLS's own messages apart. Deadlines are the caller's
(``asyncio.timeout`` around a call).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct

from sidecar.net.resolver import Lookup, LookupFailed, numeric_infos

CHUNK = 64 * 1024  # per read: a stream holds at most about this much per direction
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux


class PeerClosed(ConnectionError):
    """The peer's side of the connection ended (in the middle of something)."""


HANDSHAKE_FAILURES = ("unknown_ca", "client_closed", "protocol_error", "other")
_UNTRUSTED = ("unknown ca", "unknown_ca", "bad certificate", "bad_certificate", "certificate unknown",
              "certificate_unknown", "does not trust")


def handshake_failure(error: BaseException | str) -> str:
    """Why a client's TLS handshake with the sidecar failed, as one of HANDSHAKE_FAILURES:
    ``unknown_ca`` when the client rejected the sidecar's certificate (it does not trust the CA),
    ``client_closed`` when it left mid-handshake, ``protocol_error`` for anything else TLS complained
    about (not TLS at all, no common version or cipher), ``other`` (a timeout, ...)."""
    if isinstance(error, (PeerClosed, ConnectionResetError, BrokenPipeError, ssl.SSLEOFError)):
        return "client_closed"
    text = (error if isinstance(error, str) else f"{getattr(error, 'reason', '') or ''} {error}").lower()
    if any(marker in text for marker in _UNTRUSTED):
        return "unknown_ca"
    if isinstance(error, str) and ("connection closed" in text or "disconnected" in text):
        return "client_closed"
    if isinstance(error, ssl.SSLError) or (isinstance(error, str) and ("ssl" in text or "tls" in text)):
        return "protocol_error"
    return "other"


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


def abort(sock: socket.socket) -> None:
    """Close with a reset, so the peer sees an error and not a clean (truncating) end of stream."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def open_tcp(host: str, port: int, resolve: Lookup | None = None) -> socket.socket:
    """A connected non-blocking TCP socket with Nagle off; the caller sets the deadline. ``resolve``
    (sidecar.proxy.destinations.Destinations.resolve) looks ``host`` up and may refuse what it resolves to;
    without it ``host`` must be an IP literal, and nothing is looked up (sidecar.net.resolver)."""
    infos = await resolve(host, port) if resolve is not None else numeric_infos(host, port)
    if infos is None:
        raise LookupFailed(f"{host} is not an IP address, and no lookup was asked for")
    return await connect_any(infos, host)


async def connect_any(infos: list[tuple[int, int, int, tuple[object, ...]]], host: str = "") -> socket.socket:
    """A socket connected to the first of these addresses that answers (Nagle off), never any other: the
    caller resolved and checked them."""
    loop = asyncio.get_running_loop()
    error: OSError = OSError(f"{host or 'the destination'} has no address")
    for family, type_, proto, addr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, addr)
        except BaseException as exc:
            sock.close()
            if not isinstance(exc, OSError):
                raise
            error = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise error


class SocketStream:
    """A plain TCP connection. ``prefix``: bytes already read from the socket that come first."""

    def __init__(self, sock: socket.socket, prefix: bytes = b"") -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self._prefix = prefix

    async def recv(self, n: int = CHUNK) -> bytes:
        """Some bytes (at most ``n``); b"" once the peer has closed."""
        if self._prefix:
            data, self._prefix = self._prefix[:n], self._prefix[n:]
            return data
        quickack(self.sock)
        return await self.loop.sock_recv(self.sock, n)

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    def readable_now(self) -> bool:
        """Whether bytes (or the end of the stream) are waiting to be read."""
        if self._prefix:
            return True
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True  # an error waiting on the socket: it is not idle and clean
        return True

    def take_prefix(self) -> bytes:
        data, self._prefix = self._prefix, b""
        return data

    def close(self) -> None:
        self.sock.close()

    def abort(self) -> None:
        abort(self.sock)


class TlsStream:
    """TLS over a :class:`SocketStream`, server or client side."""

    def __init__(self, raw: SocketStream, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
        self.raw = raw
        self.sock = raw.sock
        self.obj = obj
        self._in = incoming
        self._out = outgoing
        self._sending = asyncio.Lock()  # reads flush too (key updates): one sender at a time, records in order
        self._ended = False  # the peer's side ended (close_notify or EOF): every later recv() says b"" at once
        self._ahead = b""  # data readable_now() decrypted while looking: recv() returns it first

    @classmethod
    def server(cls, raw: SocketStream, ctx: ssl.SSLContext) -> TlsStream:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        return cls(raw, ctx.wrap_bio(incoming, outgoing, server_side=True), incoming, outgoing)

    @classmethod
    def client(cls, raw: SocketStream, ctx: ssl.SSLContext, server_hostname: str) -> TlsStream:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        return cls(raw, ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname), incoming, outgoing)

    async def _flush(self) -> None:
        if not self._out.pending and not self._sending.locked():  # nothing to send (most reads): no lock
            return
        async with self._sending:
            data = self._out.read()
            if data:
                await self.raw.send(data)

    async def _fill(self) -> bool:
        data = await self.raw.recv(CHUNK)
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
                    raise PeerClosed("the peer closed during the TLS handshake") from None
            except ssl.SSLError:
                with contextlib.suppress(OSError):
                    await self._flush()  # the alert tells the peer why
                raise
        else:
            raise ssl.SSLError("TLS handshake did not finish")
        await self._flush()  # the last flight, and TLS 1.3 session tickets

    async def recv(self, n: int = CHUNK) -> bytes:
        """Some decrypted bytes (at most ``n``); b"" once the peer has closed."""
        if self._ahead:
            data, self._ahead = self._ahead[:n], self._ahead[n:]
            return data
        while not self._ended:
            if self._in.pending or self.obj.pending():  # else read() can only say "want read": skip the exception
                try:
                    data = self.obj.read(n)
                except ssl.SSLWantReadError:
                    pass  # part of a record, or a post-handshake message (a ticket, a key update)
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    break
                else:
                    if data:
                        return data
                    break  # (the ssl module says close_notify with b"" as well)
            await self._flush()  # what reading produced (a key update's answer)
            if not await self._fill():
                break
        self._ended = True
        return b""

    async def send(self, data: bytes) -> None:
        self.obj.write(data)
        await self._flush()

    def readable_now(self) -> bool:
        """Whether data (or the end of the stream) is waiting. What already sits on the socket is decrypted
        to tell: TLS's own messages after the handshake (TLS 1.3 session tickets, key updates) are not
        data, so a connection whose server sent only those (a spare nobody used yet) is idle and clean.
        Data found is kept for recv(); nothing is waited for."""
        if self._ahead or self._ended:
            return True
        for _ in range(64):  # bounded: what has arrived, a chunk at a time
            chunk = self.raw.take_prefix()
            if not chunk:
                try:
                    chunk = self.sock.recv(CHUNK)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    return True  # an error waiting on the socket: it is not idle and clean
                if not chunk:
                    self._in.write_eof()
                    break
            self._in.write(chunk)
        if not (self._in.pending or self.obj.pending() or self._in.eof):
            return False
        try:
            self._ahead = self.obj.read(CHUNK)
        except ssl.SSLWantReadError:
            return False  # records of TLS's own (processed), or part of one: no data
        except ssl.SSLError:
            self._ended = True  # close_notify, an EOF or a broken record: not clean
            return True
        if not self._ahead:
            self._ended = True
        return True

    def close(self) -> None:
        self.raw.close()

    def abort(self) -> None:
        self.raw.abort()


Stream = SocketStream | TlsStream


LINGER_SECONDS = 5.0
LINGER_BYTES = 64 * 1024 * 1024  # an upload refused before it was read is drained up to this much


async def linger(sock: socket.socket) -> None:
    """Close after an answer sent before the request was read to its end: stop sending, then read and
    drop what the client still sends (bounded), so the kernel does not answer it with a reset that
    can destroy the answer before the client has read it (what HTTP servers call a lingering close)."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError, TimeoutError):  # the caller closes the socket next
        sock.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(LINGER_SECONDS):
            for _ in range(LINGER_BYTES // CHUNK):  # bounded in reads, bytes and time
                if not await loop.sock_recv(sock, CHUNK):
                    return

