"""The one look the sidecar takes into a tunnel it would otherwise relay untouched (a CONNECT to an IP
literal): the SNI of the client's TLS ClientHello, read with mitmproxy's parser, which tells whether it
is a token host's (served by the lane) or relayed as it came (the front door, with
:func:`sidecar.net.pipe.pipe`).
"""

from __future__ import annotations

import asyncio
import socket

from mitmproxy.proxy.layers.tls import parse_client_hello

from sidecar.net.streams import CHUNK

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
