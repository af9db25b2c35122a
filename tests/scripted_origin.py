"""A TLS origin that misbehaves on purpose: each request gets the raw bytes a script says, so tests can
show what the sidecar does with interim answers, bad lengths, close-delimited bodies and the like."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import h11

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
        self.connections = 0  # TLS connections accepted
        self.connection_of: list[int] = []  # for each request, the number of the connection it came on

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        leftover = b""
        with self._lock:
            self.connections += 1
            connection = self.connections
        for _ in range(100):  # bounded: requests per connection
            # A fresh h11 connection per request: the scripted answers are raw bytes h11 never sees.
            conn = h11.Connection(h11.SERVER)
            if leftover:  # (receive_data(b"") would mean the end of the stream)
                conn.receive_data(leftover)
            head = b""
            body = bytearray()
            for _ in range(100_000):  # bounded: reads per request
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    if not data and not head:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    head = b"%s %s HTTP/%s\r\n" % (event.method, event.target, event.http_version) + b"".join(
                        k + b": " + v + b"\r\n" for k, v in event.headers.raw_items()) + b"\r\n"
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
            leftover = conn.trailing_data[0]
            with self._lock:
                self.requests.append((writer.get_extra_info("peername")[0], head + bytes(body)))
                self.connection_of.append(connection)
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
