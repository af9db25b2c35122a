"""Byte streams over the event loop's own socket transports: plain TCP and TLS, for every connection the
sidecar serves or opens.

Each socket is handed to the loop once (:meth:`SocketStream.attach`: ``asyncio.BufferedProtocol``), so its
descriptor is registered with epoll once for its whole life instead of once per read (``sock_recv`` adds
and removes a reader per call, after a ``recv`` that usually finds nothing: three system calls per wait).
What arrives is read into one buffer shared by every stream and copied out at once: into the stream's
own small buffer, or, once TLS runs on it, straight into the TLS object's memory BIO.

TLS runs on :class:`ssl.SSLObject` with memory BIOs, not on asyncio's SSL transport: that transport keeps
a 256 KiB buffer per connection, while a token host's keep-alive connection here holds a few KiB, and
:meth:`TlsStream.readable_now` must tell exactly whether a peer sent data nobody asked for (a pooled
connection with such data is never reused), TLS's own messages apart. Reading pauses when a stream holds
more than CHUNK bytes nobody has asked for, so a stream holds at most about two per direction.

Deadlines: every wait takes an absolute ``deadline`` (the event loop's clock; None: none) and raises
TimeoutError when it passes: one deadline for a whole exchange (a head, a body, an answer), checked by
one timer per stream that is re-armed only when a wait needs an earlier one, instead of an
``asyncio.timeout`` (a timer, a context and a cancellation) per step. ``asyncio.timeout`` around a call
still works.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import ssl
import struct
import termios

from sidecar.net.resolver import Lookup, LookupFailed, numeric_infos

# Per read; a stream pauses reading once more than this waits unread (so it holds at most two per direction).
# Measured on a relayed 128 MiB download (sidecar CPU per GB, GB/s, interleaved with the code before the
# loop's transports): 64 KiB paused and resumed the transport on every full read (two epoll_ctl per chunk):
# 0.71 s/GB where the old relay took 0.34; not pausing on one full read, 0.44 s/GB at 90 % of its GB/s;
# 128 KiB, 97 %; 256 KiB, 98 % but four times the memory a slow reader can hold.
CHUNK = 128 * 1024
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux
# Every stream's reads land here first (recv_into) and are copied out before the next read: the event
# loop runs one protocol callback at a time, so one buffer serves every connection.
_SCRATCH = memoryview(bytearray(CHUNK))


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
    mode on its own, so it is set again whenever a stream starts waiting for bytes (setting it also
    sends an ACK that is pending).
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


class _Protocol(asyncio.BufferedProtocol):
    """The loop's side of a :class:`SocketStream`: hands it what arrives, the end and the loss."""

    __slots__ = ("stream",)

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.stream._transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return _SCRATCH

    def buffer_updated(self, nbytes: int) -> None:
        self.stream._feed(_SCRATCH[:nbytes])

    def eof_received(self) -> bool:
        self.stream._feed_eof()
        return True  # keep the transport: our side may still write (a half-closed connection)

    def connection_lost(self, exc: Exception | None) -> None:
        self.stream._lost(exc)

    def pause_writing(self) -> None:
        self.stream._write_paused = True

    def resume_writing(self) -> None:
        self.stream._write_paused = False
        self.stream._wake_writer()


class SocketStream:
    """A TCP connection on the loop's transport. Make one with :meth:`attach`; every close goes through it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()  # received and not yet read (plain data; ciphertext goes to ``_bio``)
        self._bio: ssl.MemoryBIO | None = None  # a TLS object's incoming BIO, once TLS runs on this stream
        self._eof = False  # the peer's side ended
        self._error: BaseException | None = None  # the connection failed (or was closed here)
        self._paused = False  # reading paused: CHUNK bytes wait unread
        self._write_paused = False  # the transport holds more than its high-water mark
        self._reader: asyncio.Future[None] | None = None
        self._writer: asyncio.Future[None] | None = None
        self._read_by: float | None = None  # the deadlines of the waits under way
        self._written_by: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._discard = 0  # lingering: bytes still to read and drop (0: not lingering)
        self.fed = 0  # how many times something arrived (a reader tells whether anything came meanwhile)
        self.recording: bytearray | None = None  # when set, every byte recv() returns is appended here

    @classmethod
    async def attach(cls, sock: socket.socket, prefix: bytes = b"") -> SocketStream:
        """The stream of a connected socket (it now belongs to the stream). ``prefix``: bytes already read
        from the socket, which come first."""
        stream = cls(sock)
        stream._buf += prefix
        try:
            await stream.loop.connect_accepted_socket(lambda: _Protocol(stream), sock)
        except BaseException:
            sock.close()
            raise
        return stream

    # -- what the transport reports ----------------------------------------------------------------
    def _feed(self, data: memoryview) -> None:
        self.fed += 1
        if self._discard:
            self._discard = max(0, self._discard - len(data)) or -1  # (-1: the limit was reached)
            self._wake_reader()
            return
        if self._bio is not None:
            self._bio.write(data)
            held = self._bio.pending
        else:
            self._buf += data
            held = len(self._buf)
        if held > CHUNK and not self._paused and self._transport is not None:  # (one full read alone: no pause)
            self._paused = True
            self._transport.pause_reading()
        self._wake_reader()

    def _feed_eof(self) -> None:
        self.fed += 1
        if not self._eof:
            self._eof = True
            if self._bio is not None:
                self._bio.write_eof()
        self._wake_reader()

    def _lost(self, exc: BaseException | None) -> None:
        if self._error is None:
            self._error = exc if exc is not None else _Closed("the connection is closed")
        self._feed_eof()
        self._wake_writer()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake_reader(self) -> None:
        waiter = self._reader
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_writer(self) -> None:
        waiter = self._writer
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _consumed(self, held: int) -> None:
        """Something was read: resume reading once no more than CHUNK waits."""
        if self._paused and held <= CHUNK and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()

    # -- deadlines: one timer per stream, re-armed only when a wait needs an earlier one ------------------
    def _arm(self, deadline: float) -> None:
        if self._timer is None or self._timer_at > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def _on_timer(self) -> None:
        self._timer = None
        now = self.loop.time()
        nearest: float | None = None
        for waiter, deadline in ((self._reader, self._read_by), (self._writer, self._written_by)):
            if waiter is None or waiter.done() or deadline is None:
                continue
            if now >= deadline:
                waiter.set_exception(TimeoutError())
            elif nearest is None or deadline < nearest:
                nearest = deadline
        if nearest is not None:
            self._arm(nearest)

    async def wait_readable(self, deadline: float | None = None) -> None:
        """Until something arrives (or the end, or a failure); TimeoutError past ``deadline``."""
        if self._reader is not None:
            raise RuntimeError("two readers on one stream")
        if self._paused and self._transport is not None:  # waiting for more: what is held is not enough
            self._paused = False
            self._transport.resume_reading()
        quickack(self.sock)
        waiter = self._reader = self.loop.create_future()
        self._read_by = deadline
        if deadline is not None:
            self._arm(deadline)
        try:
            await waiter
        finally:
            self._reader = None
            self._read_by = None

    # -- the stream ------------------------------------------------------------------------------------
    async def recv(self, n: int = CHUNK, deadline: float | None = None) -> bytes:
        """Some bytes (at most ``n``); b"" once the peer has closed. Raises the connection's failure
        (ConnectionResetError, ...) and TimeoutError past ``deadline``."""
        for _ in range(2 + CHUNK):  # bounded: a wait ends with data, the end or a failure
            if self._buf:
                if len(self._buf) <= n:  # (the usual case: all of it, one copy)
                    data = bytes(self._buf)
                    self._buf.clear()
                else:
                    with memoryview(self._buf) as view:
                        data = bytes(view[:n])
                    del self._buf[:n]
                self._consumed(len(self._buf))
                if self.recording is not None:
                    self.recording += data
                return data
            if self._eof:
                if self._error is not None and not isinstance(self._error, _Closed):
                    raise self._error
                return b""
            await self.wait_readable(deadline)
        return b""  # pragma: no cover - bounded above

    async def send(self, data: bytes, deadline: float | None = None) -> None:
        """Hand ``data`` to the kernel (what it cannot take yet, to the transport's buffer); waits only
        while the transport holds more than its high-water mark (a peer that stops reading)."""
        if self._error is not None or self._transport is None or self._transport.is_closing():
            raise self._error if isinstance(self._error, OSError) and not isinstance(self._error, _Closed) \
                else BrokenPipeError("the connection is closed")
        if data:
            self._transport.write(data)
        if self._write_paused:
            await self._drain(deadline)

    async def _drain(self, deadline: float | None) -> None:
        for _ in range(1_000_000):  # bounded: each wake-up is the transport draining or failing
            if not self._write_paused:
                return
            if self._error is not None:
                raise BrokenPipeError("the connection closed with data unsent")
            waiter = self._writer = self.loop.create_future()
            self._written_by = deadline
            if deadline is not None:
                self._arm(deadline)
            try:
                await waiter
            finally:
                self._writer = None
                self._written_by = None

    def unread(self, data: bytes) -> None:
        """Put ``data`` back in front of what is still to be read."""
        if data:
            self._buf[:0] = data

    def take_prefix(self) -> bytes:
        """Everything received and not yet read (without waiting)."""
        data = bytes(self._buf)
        self._buf.clear()
        self._consumed(0)
        return data

    def readable_now(self) -> bool:
        """Whether bytes (or the end of the stream) are waiting to be read, here or in the kernel."""
        if self._buf or self._eof:
            return True
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True  # an error waiting on the socket: it is not idle and clean
        return True

    def read_arrived(self) -> None:
        """Read what the kernel holds for this stream right now, without waiting (it is fed as if the loop
        had read it: into the buffer, or the TLS object's BIO)."""
        for _ in range(64):  # bounded: what has arrived, a chunk at a time
            if self._eof or self._paused:
                return
            try:
                n = self.sock.recv_into(_SCRATCH)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lost(exc)
                return
            if not n:
                self._feed_eof()
                return
            self._feed(_SCRATCH[:n])

    def use_bio(self, bio: ssl.MemoryBIO) -> None:
        """From now on, what arrives goes to a TLS object's incoming BIO (what is buffered goes first)."""
        if self._buf:
            bio.write(bytes(self._buf))
            self._buf.clear()
        if self._eof:
            bio.write_eof()
        self._bio = bio

    def unsent(self) -> int:
        """Bytes written and not yet taken by the peer: in the transport's buffer and the kernel's queue."""
        queued = self._transport.get_write_buffer_size() if self._transport is not None else 0
        try:
            return queued + struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        except (OSError, ValueError):
            return queued

    def shutdown_write(self) -> None:
        """Say the end of our side (after what is buffered); the peer may still send."""
        if self._transport is not None and not self._transport.is_closing() and self._transport.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                self._transport.write_eof()

    async def linger(self, seconds: float, limit: int) -> None:
        """Stop sending, then read and drop what the peer still sends (at most ``limit`` bytes, for at most
        ``seconds``) until it closes: see :func:`linger`."""
        self.shutdown_write()
        self._bio = None
        self._buf.clear()
        self._discard = limit
        self._consumed(0)
        deadline = self.loop.time() + seconds
        with contextlib.suppress(OSError, TimeoutError):
            for _ in range(limit // 1024 + 2):  # bounded: each wake-up is data, the end or the deadline
                if self._eof or self._discard < 0:
                    return
                await self.wait_readable(deadline)

    def close(self) -> None:
        """Close after what is buffered is sent (at once when nothing is)."""
        if self._error is None:
            self._error = _Closed("the connection is closed")
        if self._transport is not None:
            self._transport.close()
        else:
            self.sock.close()

    def abort(self) -> None:
        """Close at once, with a reset."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if self._error is None:
            self._error = _Closed("the connection is closed")
        if self._transport is not None:
            self._transport.abort()
        else:
            self.sock.close()


class _Closed(ConnectionResetError):
    """This side closed the stream (a read after it sees the end, a write fails)."""


class TlsStream:
    """TLS over a :class:`SocketStream`, server or client side."""

    def __init__(self, raw: SocketStream, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
        self.raw = raw
        self.sock = raw.sock
        self.obj = obj
        self._in = incoming
        self._out = outgoing
        self._ended = False  # the peer's side ended (close_notify or EOF): every later recv() says b"" at once
        self._ahead = b""  # data readable_now() decrypted while looking: recv() returns it first
        raw.use_bio(incoming)

    @classmethod
    def server(cls, raw: SocketStream, ctx: ssl.SSLContext) -> TlsStream:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        return cls(raw, ctx.wrap_bio(incoming, outgoing, server_side=True), incoming, outgoing)

    @classmethod
    def client(cls, raw: SocketStream, ctx: ssl.SSLContext, server_hostname: str,
               session: ssl.SSLSession | None = None) -> TlsStream:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        return cls(raw, ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname, session=session),
                   incoming, outgoing)

    async def _flush(self, deadline: float | None = None) -> None:
        if self._out.pending:
            await self.raw.send(self._out.read(), deadline)

    async def _fill(self, deadline: float | None) -> bool:
        """Wait for more of the peer's records; False at its end. Raises the connection's failure."""
        raw = self.raw
        if raw._eof:
            if raw._error is not None and not isinstance(raw._error, _Closed):
                raise raw._error
            return False
        await raw.wait_readable(deadline)
        return True

    async def handshake(self, deadline: float | None = None) -> None:
        for _ in range(100):  # bounded: a handshake takes a few round trips
            seen = self.raw.fed
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush(deadline)
                if self.raw.fed == seen and not await self._fill(deadline):
                    raise PeerClosed("the peer closed during the TLS handshake") from None
            except ssl.SSLError:
                with contextlib.suppress(OSError):
                    await self._flush(deadline)  # the alert tells the peer why
                raise
        else:
            raise ssl.SSLError("TLS handshake did not finish")
        await self._flush(deadline)  # the last flight, and TLS 1.3 session tickets

    async def recv(self, n: int = CHUNK, deadline: float | None = None) -> bytes:
        """Some decrypted bytes (at most ``n``); b"" once the peer has closed."""
        if self._ahead:
            data, self._ahead = self._ahead[:n], self._ahead[n:]
            return data
        for _ in range(1_000_000):  # bounded: every round reads a record or waits for one
            if self._ended:
                break
            seen = self.raw.fed
            if self._in.pending or self.obj.pending():  # else read() can only say "want read": skip the exception
                try:
                    data = self.obj.read(n)
                except ssl.SSLWantReadError:
                    pass  # part of a record, or a post-handshake message (a ticket, a key update)
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    break
                else:
                    self.raw._consumed(self._in.pending)
                    if data:
                        return data
                    break  # (the ssl module says close_notify with b"" as well)
                self.raw._consumed(self._in.pending)
            await self._flush(deadline)  # what reading produced (a key update's answer)
            if self.raw.fed != seen:
                continue  # more arrived while flushing
            if not await self._fill(deadline):
                if self._in.pending or self.obj.pending():
                    continue  # the end came with the last records: read them first
                break
        self._ended = True
        return b""

    async def send(self, data: bytes, deadline: float | None = None) -> None:
        self.obj.write(data)
        await self._flush(deadline)

    def readable_now(self) -> bool:
        """Whether data (or the end of the stream) is waiting. What already sits on the socket is decrypted
        to tell: TLS's own messages after the handshake (TLS 1.3 session tickets, key updates) are not
        data, so a connection whose server sent only those (a spare nobody used yet) is idle and clean.
        Data found is kept for recv(); nothing is waited for."""
        if self._ahead or self._ended:
            return True
        self.raw.read_arrived()
        if not (self._in.pending or self.obj.pending() or self._in.eof):
            return False
        try:
            self._ahead = self.obj.read(CHUNK)
        except ssl.SSLWantReadError:
            self.raw._consumed(self._in.pending)
            return False  # records of TLS's own (processed), or part of one: no data
        except ssl.SSLError:
            self._ended = True  # close_notify, an EOF or a broken record: not clean
            return True
        self.raw._consumed(self._in.pending)
        if not self._ahead:
            self._ended = True
        return True

    @property
    def session(self) -> ssl.SSLSession | None:
        """The TLS session (with TLS 1.3, known once the server's tickets were read), to resume another."""
        return self.obj.session

    def unread(self, data: bytes) -> None:
        self._ahead = data + self._ahead

    def close(self) -> None:
        self.raw.close()

    def abort(self) -> None:
        self.raw.abort()


Stream = SocketStream | TlsStream


LINGER_SECONDS = 5.0
LINGER_BYTES = 64 * 1024 * 1024  # an upload refused before it was read is drained up to this much


async def linger(stream: Stream) -> None:
    """Close after an answer sent before the request was read to its end: stop sending, then read and
    drop what the client still sends (bounded), so the kernel does not answer it with a reset that
    can destroy the answer before the client has read it (what HTTP servers call a lingering close).
    The caller closes the stream next."""
    raw = stream.raw if isinstance(stream, TlsStream) else stream
    await raw.linger(LINGER_SECONDS, LINGER_BYTES)
