"""Clients for the token lane's tests: an HTTPS connection tunnelled through the sidecar to a token host on
loopback (``localhost``), or the raw TLS socket of such a tunnel."""

from __future__ import annotations

import http.client
import socket
import ssl
from pathlib import Path

from tests.harness import SidecarProcess


def https_via(sc: SidecarProcess, port: int, ca: Path | None = None) -> http.client.HTTPSConnection:
    ctx = ssl.create_default_context(cafile=str(ca or sc.ca_bundle))
    conn = http.client.HTTPSConnection("127.0.0.1", sc.proxy_port, context=ctx, timeout=20)
    conn.set_tunnel("localhost", port)
    return conn


def tls_tunnel(sc: SidecarProcess, port: int) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=10)
    raw.sendall(b"CONNECT localhost:%d HTTP/1.1\r\nHost: localhost:%d\r\n\r\n" % (port, port))
    head = b""
    for _ in range(50):  # bounded
        head += raw.recv(4096)
        if b"\r\n\r\n" in head:
            break
    assert head.startswith(b"HTTP/1.1 200"), head
    return ssl.create_default_context(cafile=str(sc.ca_bundle)).wrap_socket(raw, server_hostname="localhost")


def read_all(sock: ssl.SSLSocket, limit: int = 200) -> bytes:
    out = b""
    for _ in range(limit):  # bounded: until the sidecar closes
        try:
            chunk = sock.recv(65536)
        except (OSError, ssl.SSLError):
            break
        if not chunk:
            break
        out += chunk
    return out


def get(conn: http.client.HTTPSConnection, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, bytes, http.client.HTTPResponse]:
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    return resp.status, resp.read(), resp
