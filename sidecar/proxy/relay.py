"""Tunnels the sidecar does not decrypt: bytes copied both ways between the app and the target (direct,
or through a pair member with ``SIDECAR_ROUTE=all``), never buffered beyond one chunk per direction.
And the one look the sidecar takes into a tunnel to an IP literal: the SNI of its TLS ClientHello (read
with mitmproxy's parser), which tells whether it is a token host's (served by the lane) or relayed.

Half-closes and resets are passed on; a tunnel on which nothing moved for ``SIDECAR_IDLE_TIMEOUT`` is
cut with a reset; progress of a send to a slow reader (bytes leaving the kernel's send queue) counts as
activity, so a slow but steady download is never cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios

from mitmproxy.proxy.layers.tls import parse_client_hello

from sidecar.config import Upstream
from sidecar.egress.pair import Member
from sidecar.net.streams import CHUNK, SocketStream, abort, open_tcp, quickack
from sidecar.net.upstream import ConnectFailure, describe_error, open_tunnel
from sidecar.proxy.destinations import DestinationRefused, Destinations

MAX_WAKEUPS = 10_000_000  # bounded: idle checks of one tunnel
MAX_CLIENT_HELLO = 64 * 1024  # a ClientHello is a few hundred bytes to a few KiB (post-quantum key shares)
FIRST_BYTES_WAIT = 1.0  # a client that sends nothing first (a server-speaks-first protocol) is relayed after this


class UnfinishedHello(Exception):
    """The client began a TLS ClientHello and did not finish it (in time, or within MAX_CLIENT_HELLO)."""


async def client_hello_sni(sock: socket.socket, data: bytes, deadline: float) -> tuple[str | None, bytes]:
    """The SNI of the TLS ClientHello a client sends first in a tunnel, and the bytes read to find it
    (``data``: those already read). None when the client speaks something else than TLS, sends no SNI, or
    sends nothing within FIRST_BYTES_WAIT. Raises UnfinishedHello for a ClientHello begun and not finished
    within ``deadline`` seconds: never relayed as is, or an unfinished token host's hello would leave
    unguarded."""
    loop = asyncio.get_running_loop()
    buf = bytearray(data)
    try:
        async with asyncio.timeout(deadline):
            for _ in range(MAX_CLIENT_HELLO + 1):  # bounded: each read adds at least one byte
                if buf:
                    if not _may_start_tls(buf):
                        return None, bytes(buf)  # a short message that cannot be TLS: relayed at once
                    try:
                        hello = parse_client_hello(bytes(buf))
                    except ValueError:
                        return None, bytes(buf)  # not TLS (or not a ClientHello): relayed untouched
                    if hello is not None:
                        return hello.sni, bytes(buf)
                    if len(buf) > MAX_CLIENT_HELLO:
                        break
                    chunk = await loop.sock_recv(sock, CHUNK)
                else:
                    try:
                        chunk = await asyncio.wait_for(loop.sock_recv(sock, CHUNK), FIRST_BYTES_WAIT)
                    except TimeoutError:
                        return None, b""
                if not chunk:
                    break
                buf += chunk
    except TimeoutError:
        pass
    raise UnfinishedHello(f"no whole TLS ClientHello from the client ({len(buf)} bytes, then it closed or stalled)")


def _may_start_tls(data: bytearray) -> bool:
    """Whether ``data`` can be the start of a TLS record carrying a ClientHello: a handshake record (0x16)
    of version 3.x, x at most 3 (mitmproxy's ``starts_like_tls_record``, which needs 3 bytes to say no; a
    shorter prefix of such a header must still wait)."""
    return data[0] == 0x16 and (len(data) < 2 or data[1] == 0x03) and (len(data) < 3 or data[2] <= 0x03)


async def open_target(host: str, port: int, member: Member | None, upstream: Upstream | None,
                      destinations: Destinations) -> SocketStream:
    """A connection to host:port, direct or through ``member``'s tunnel (the caller sets the deadline).
    Raises ConnectFailure (``refused`` when the destination rules say no: nothing was connected)."""
    where = f"pair member {member.label}" if member else f"{host}:{port}"
    try:
        if member is not None:
            destinations.check_literal(host, port)  # a name is the member's to resolve
            sock = await open_tcp(*member.address.address)
        else:
            sock = await open_tcp(host, port, destinations.resolve)
    except DestinationRefused as exc:
        raise ConnectFailure("refused", str(exc), member_fault=False, ejects=False, refused=True) from None
    except OSError as exc:
        raise ConnectFailure("unreachable", f"cannot connect to {where}: {describe_error(exc)}") from None
    if member is None:
        return SocketStream(sock)
    assert upstream is not None
    try:
        return await open_tunnel(SocketStream(sock), upstream, member, host, port)
    except BaseException:
        sock.close()
        raise


async def _ready(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Wait until the socket is writable, without writing anything."""
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_writer(sock.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_writer(sock.fileno())


def _unsent(sock: socket.socket) -> int:
    """Bytes still queued in the kernel for the peer (Linux SIOCOUTQ); 0 where that is unknown."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return 0


async def pipe_both(a: SocketStream, b: SocketStream, idle_timeout: float, a_to_b: bytes = b"") -> None:
    """Copy both ways until both sides are done or nothing moved for ``idle_timeout`` seconds (then both
    are reset). ``a_to_b``: bytes ``a`` already sent that go to ``b`` first; bytes held by either
    stream (read past a head) go first in their direction."""
    loop = asyncio.get_running_loop()
    last = [loop.time()]
    reset = [False]

    async def pipe(src: SocketStream, dst: socket.socket, first: bytes) -> None:
        try:
            data = first + src.take_prefix()
            for _ in range(MAX_WAKEUPS):
                if data:
                    last[0] = loop.time()
                    view = memoryview(data)
                    while view:
                        try:
                            sent = dst.send(view)
                        except (BlockingIOError, InterruptedError):
                            await _ready(loop, dst)
                            continue
                        view = view[sent:]
                        last[0] = loop.time()
                # A fresh chunk per read, sized to what arrived: an idle tunnel holds no buffer.
                quickack(src.sock)
                data = await loop.sock_recv(src.sock, CHUNK)
                if not data:
                    break
        except ConnectionResetError:
            reset[0] = True
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    tasks = [asyncio.create_task(pipe(a, b.sock, a_to_b)), asyncio.create_task(pipe(b, a.sock, b""))]
    seen_queued = (0, 0)
    idle = False
    try:
        for _ in range(MAX_WAKEUPS):
            done, _ = await asyncio.wait(tasks, timeout=min(idle_timeout, 30.0), return_when=asyncio.ALL_COMPLETED)
            if len(done) == 2 or reset[0]:
                break
            if loop.time() - last[0] > idle_timeout:
                # Bytes queued in the kernel for a slow reader drain without any call of ours: a
                # queue that shrank since the last look is progress, not idleness.
                queued = (_unsent(a.sock), _unsent(b.sock))
                if queued != seen_queued:
                    seen_queued = queued
                    last[0] = loop.time()
                    continue
                idle = True
                break
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if idle or reset[0]:
            abort(a.sock)
            abort(b.sock)
