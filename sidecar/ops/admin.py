"""The admin server: /metrics, /healthz, /serving, /readyz, /status, /ca.pem and the status page at /.

A small threaded HTTP server from the standard library, on its own port and thread, so a scrape or a
probe never waits behind proxy traffic (and vice versa). It only reads snapshots of the service.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger("egress_sidecar.admin")


class AdminSource(Protocol):
    def metrics_text(self) -> bytes: ...
    def is_serving(self) -> tuple[bool, str]: ...
    def is_ready(self) -> tuple[bool, str]: ...
    def status(self, orgs_page: int = 1) -> dict[str, Any]: ...
    def ca_path(self) -> Path | None: ...


def _make_handler(source: AdminSource, page: Callable[[dict[str, Any]], str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "egress-sidecar"
        protocol_version = "HTTP/1.1"
        timeout = 10  # seconds: a silent or slow client does not hold a thread for ever

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            log.debug("admin %s", format % args)

        def _send(self, status: int, body: bytes, ctype: str, head_only: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if not head_only:
                self.wfile.write(body)

        def _json(self, status: int, data: Any, head_only: bool = False) -> None:
            self._send(status, json.dumps(data, indent=2, default=str).encode(), "application/json", head_only)

        def do_HEAD(self) -> None:
            self._route(head_only=True)

        def do_GET(self) -> None:
            self._route(head_only=False)

        def _route(self, head_only: bool) -> None:
            path, _, query = self.path.partition("?")
            try:
                if path == "/metrics":
                    self._send(200, source.metrics_text(), CONTENT_TYPE_LATEST, head_only)
                elif path == "/healthz":
                    self._json(200, {"status": "ok"}, head_only)
                elif path == "/serving":
                    serving, why = source.is_serving()
                    self._json(200 if serving else 503, {"serving": serving, "reason": why}, head_only)
                elif path == "/readyz":
                    ready, why = source.is_ready()
                    self._json(200 if ready else 503, {"ready": ready, "reason": why}, head_only)
                elif path == "/status":
                    self._json(200, source.status(orgs_page(query)), head_only)
                elif path == "/ca.pem":
                    ca = source.ca_path()
                    if ca is None or not ca.exists():
                        self._json(503, {"error": "CA not created yet"}, head_only)
                    else:
                        self._send(200, ca.read_bytes(), "application/x-pem-file", head_only)
                elif path in ("/", "/index.html"):
                    html = page(source.status(orgs_page(query))).encode()
                    self._send(200, html, "text/html; charset=utf-8", head_only)
                else:
                    self._json(404, {"error": "not found", "endpoints": ENDPOINTS}, head_only)
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception:  # a bug in a page must not take the admin server down
                log.exception("admin endpoint %s failed", path)
                self._json(500, {"error": "internal error"}, head_only)

        def do_POST(self) -> None:
            self._json(405, {"error": "method not allowed"})

    return Handler


ENDPOINTS = ["/", "/metrics", "/healthz", "/serving", "/readyz", "/status", "/ca.pem"]
MAX_PAGE = 1_000_000


def orgs_page(query: str) -> int:
    """The page of the per-org table a query asks for (``?orgs_page=N``, 1-based); 1 when absent or malformed
    (a page past the last shows the last)."""
    values = parse_qs(query).get("orgs_page") or ["1"]
    try:
        return min(MAX_PAGE, max(1, int(values[0])))
    except ValueError:
        return 1


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class AdminServer:
    def __init__(
        self, host: str, port: int, source: AdminSource, page: Callable[[dict[str, Any]], str]
    ) -> None:
        server_class = _Server6 if ":" in host else _Server
        self.httpd = server_class((host, port), _make_handler(source, page))
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="admin", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)
