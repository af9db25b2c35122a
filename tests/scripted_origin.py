"""A TLS origin that misbehaves on purpose: each request gets the raw bytes a script says, so tests can
show what the sidecar does with interim answers, bad lengths, close-delimited bodies and the like."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from sidecar.sim._server import ThreadedServer
from sidecar.sim.certs import server_context

Script = Callable[[int, bytes], list[bytes | float]]  # (request number, request head) -> writes and pauses


def token_body(n: int) -> bytes:
    return b'{"access_token":"AT%d","refresh_token":"RT%d","instance_url":"https://x","token_type":"Bearer"}' % (n, n)


def ok(n: int, head: bytes) -> list[bytes | float]:
    body = token_body(n)
    return [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body]


class ScriptedOrigin(ThreadedServer):
    def __init__(self, cert: tuple[Path, Path], script: Script = ok) -> None:
        super().__init__("127.0.0.1", 0, ssl_context=server_context(*cert))
        self.script = script
        self.requests: list[tuple[str, bytes]] = []  # (source ip, request head + body)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(100):  # bounded: requests per connection
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            length, chunked = 0, False
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
                if line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower():
                    chunked = True
            body = await _read_chunked(reader) if chunked else await reader.readexactly(length)
            with self._lock:
                self.requests.append((writer.get_extra_info("peername")[0], head + body))
                n = len(self.requests)
            for step in self.script(n, head):
                if isinstance(step, float):
                    await asyncio.sleep(step)
                elif step == b"<close>":
                    writer.close()
                    return
                else:
                    writer.write(step)
                    await writer.drain()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    """A chunked request body, de-chunked (what the origin application would see)."""
    body = b""
    for _ in range(10_000):  # bounded: chunks per body
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return body
        body += await reader.readexactly(size)
        await reader.readexactly(2)
    raise ValueError("too many chunks")
