"""A fake ip.quotaguard.com: answers with the caller's TCP source address.

Why: the sidecar learns which egress IP each QuotaGuard member uses by probing an IP echo through
it (REFERENCE.md: the member -> IP mapping is not confirmed, so it is measured). The answer is the
peer address of the connection, as the real service sees it; optionally over TLS.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ._server import HttpServerConnection, ThreadedServer
from .certs import server_context


@dataclass(frozen=True, slots=True)
class EchoHit:
    source_ip: str
    method: str
    path: str
    status: int
    at: float = field(default_factory=time.time)


class FakeIPEcho(ThreadedServer):
    """GET / -> {"ip":"<peer>"}; GET /plain -> "<peer>\\n"; anything else 404."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        certfile: str | Path | None = None,
        keyfile: str | Path | None = None,
    ) -> None:
        if (certfile is None) != (keyfile is None):
            raise ValueError("certfile and keyfile go together")
        ctx = server_context(certfile, keyfile) if certfile and keyfile else None
        super().__init__(host, port, ssl_context=ctx)
        self._hits: list[EchoHit] = []

    @property
    def hits(self) -> list[EchoHit]:
        with self._lock:
            return list(self._hits)

    def reset_hits(self) -> None:
        with self._lock:
            self._hits.clear()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ip = str(writer.get_extra_info("peername")[0])
        conn = HttpServerConnection(reader, writer, self.read_timeout)
        while (req := await conn.read_request()) is not None:
            path = urlsplit(req.target).path
            if req.method not in ("GET", "HEAD"):
                status, body, ctype = 405, b'{"error":"method not allowed"}', "application/json"
            elif path == "/":
                status, body, ctype = 200, json.dumps({"ip": ip}).encode(), "application/json"
            elif path == "/plain":
                status, body, ctype = 200, f"{ip}\n".encode(), "text/plain"
            else:
                status, body, ctype = 404, b'{"error":"not found"}', "application/json"
            with self._lock:
                self._hits.append(EchoHit(ip, req.method, req.target, status))
            await conn.respond(status, body, {"Content-Type": ctype})
            if not conn.keep_alive:
                return
