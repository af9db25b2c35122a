"""The one look the sidecar takes into a tunnel it would otherwise relay untouched (a CONNECT to an IP
literal): the SNI of the client's TLS ClientHello, read with mitmproxy's parser, which tells whether it
is a token host's (served by the lane) or relayed as it came (the front door, with
:func:`sidecar.net.pipe.pipe`).
"""

from __future__ import annotations

import asyncio

from mitmproxy.proxy.layers.tls import parse_client_hello

from sidecar.net.streams import CHUNK, SocketStream

MAX_CLIENT_HELLO = 64 * 1024  # a ClientHello is a few hundred bytes to a few KiB (post-quantum key shares)


class UnfinishedHello(Exception):
    """The client began a TLS ClientHello and did not finish it (in time, or within MAX_CLIENT_HELLO)."""


async def client_hello_sni(stream: SocketStream, data: bytes, deadline: float) -> tuple[str | None, bytes]:
    """The SNI of the TLS ClientHello a client sends first in a tunnel, and the bytes read to find it
    (``data``: those already read). Waits for it up to ``deadline`` seconds (the head deadline: as long as a
    client may take to send a request head, so a late ClientHello is read all the same, never relayed
    unread). None at once when the first bytes cannot begin a TLS record (another protocol: relayed), and
    when the ClientHello has no SNI; None, with no bytes, when the client sent nothing at all within
    ``deadline`` (a protocol whose server speaks first: relayed then). Raises UnfinishedHello for a
    ClientHello begun and not finished within ``deadline``: never relayed as is, or an unfinished token
    host's hello would leave unguarded."""
    until = asyncio.get_running_loop().time() + deadline  # one deadline for the whole ClientHello
    buf = bytearray(data)
    try:
        for _ in range(MAX_CLIENT_HELLO + 1):  # bounded: each read adds at least one byte
            if buf:
                if not _may_be_tls(buf):
                    return None, bytes(buf)  # not TLS, however short: relayed untouched, at once
                try:
                    hello = parse_client_hello(bytes(buf))
                except ValueError:
                    return None, bytes(buf)  # not TLS (or not a ClientHello): relayed untouched
                if hello is not None:
                    return hello.sni, bytes(buf)
                if len(buf) > MAX_CLIENT_HELLO:
                    break
            chunk = await stream.recv(CHUNK, until)
            if not chunk:
                break
            buf += chunk
    except TimeoutError:
        if not buf:
            return None, b""  # nothing sent first: a server-speaks-first protocol
    raise UnfinishedHello(f"no whole TLS ClientHello from the client ({len(buf)} bytes, then it closed or stalled)")


def _may_be_tls(data: bytes | bytearray) -> bool:
    """Whether ``data`` can still be the start of a TLS handshake record: 0x16, then version 3.x (x <= 3).
    mitmproxy's own check needs 3 bytes; a shorter non-TLS message must not wait for more."""
    return data[0] == 0x16 and (len(data) < 2 or data[1] == 0x03) and (len(data) < 3 or data[2] <= 0x03)
