"""Client access: who may use the proxy, and how many at once.

The sidecar is not an open proxy: it runs next to its app, so the app connects over loopback; a client
from anywhere else is refused at connect time unless ``SIDECAR_PROXY_AUTH`` is set, and every client
must then present those credentials on every request head. Beyond ``SIDECAR_MAX_CONNECTIONS`` open
client connections, a new request gets a clear 503. The front door calls these hooks for every
connection and every head; the checks are :class:`sidecar.proxy.access.Access`.
"""

from __future__ import annotations

import h11

from sidecar.net.http1 import closing_events
from sidecar.proxy.access import Access

_AUTH_REQUIRED = closing_events(407, b"text/plain; charset=utf-8", b"egress-sidecar: proxy authentication required\n",
                                [(b"Proxy-Authenticate", b'Basic realm="egress-sidecar"')])


class ClientAccess:
    def __init__(self, access: Access) -> None:
        self.access = access

    @property
    def active(self) -> int:
        return self.access.active

    @active.setter
    def active(self, value: int) -> None:
        self.access.active = value

    def client_connected(self, client_ip: str) -> bool:
        """Whether a client from ``client_ip`` may connect at all (it may still have to authenticate)."""
        return self.access.admits(client_ip)

    def request_head(self, request: h11.Request) -> tuple[h11.Event, ...] | None:
        """The answer that refuses this request head, or None to serve it."""
        if not self.access.authorized(request.headers):
            return _AUTH_REQUIRED
        if self.access.over_capacity:
            return closing_events(503, b"application/json", self.access.over_capacity_body())
        return None
