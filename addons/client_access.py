"""Client access: who may use the proxy, and how many at once.

The sidecar is not an open proxy: it runs next to its app, so the app connects over loopback; a client
from anywhere else is refused at connect time unless ``SIDECAR_PROXY_AUTH`` is set, and every client
must then present those credentials on every request head. Beyond ``SIDECAR_MAX_CONNECTIONS`` open
client connections, a new request gets a clear 503. The front door calls these hooks for every
connection and every head; the checks are :class:`sidecar.proxy.access.Access`.
"""

from __future__ import annotations

import logging

import h11

from sidecar.logs import Throttle, event
from sidecar.metrics import Metrics
from sidecar.net.http1 import closing_events
from sidecar.proxy.access import Access

log = logging.getLogger("egress_sidecar.access")
REFUSAL_LOG_EVERY = 10.0  # seconds: at most one log line this often for clients refused at the cap

_AUTH_REQUIRED = closing_events(407, b"text/plain; charset=utf-8", b"egress-sidecar: proxy authentication required\n",
                                [(b"Proxy-Authenticate", b'Basic realm="egress-sidecar"')])


class ClientAccess:
    def __init__(self, access: Access, metrics: Metrics | None = None) -> None:
        self.access = access
        self.metrics = metrics or Metrics()
        self._cap_log = Throttle(REFUSAL_LOG_EVERY, self._log_cap_refusals)
        self._remote_log = Throttle(REFUSAL_LOG_EVERY, self._log_remote_refusals)
        self._remote_last = ""  # the last refused client's address, for the next log line

    @property
    def active(self) -> int:
        return self.access.active

    @active.setter
    def active(self, value: int) -> None:
        self.access.active = value

    def client_connected(self, client_ip: str) -> bool:
        """Whether a client from ``client_ip`` may connect at all (it may still have to authenticate)."""
        if self.access.admits(client_ip):
            return True
        self.metrics.connections_refused.labels("not_loopback").inc()
        self._remote_last = client_ip
        self._remote_log.note()
        return False

    def request_head(self, request: h11.Request) -> tuple[h11.Event, ...] | None:
        """The answer that refuses this request head, or None to serve it."""
        if not self.access.authorized(request.headers):
            return _AUTH_REQUIRED
        if self.access.over_capacity:
            self.metrics.connections_refused.labels("max_connections").inc()
            self._cap_log.note()
            return closing_events(503, b"application/json", self.access.over_capacity_body())
        return None

    def close(self) -> None:
        """At shutdown: the refusals held for the next log line are written now."""
        self._cap_log.close()
        self._remote_log.close()

    def _log_cap_refusals(self, count: int) -> None:
        limit = self.access.max_connections
        event(log, logging.WARNING,
              f"refused {count} client connection(s) with 503 too_many_connections: SIDECAR_MAX_CONNECTIONS={limit} "
              f"reached ({self.access.active} open now); raise it if the app really needs more. At most one such line "
              f"every {REFUSAL_LOG_EVERY:g}s, each counting the refusals since the last",
              event="connections_refused", reason="max_connections", refused=count, limit=limit,
              open=self.access.active)

    def _log_remote_refusals(self, count: int) -> None:
        event(log, logging.WARNING,
              f"refused {count} client connection(s) from another host (the last from {self._remote_last}): the proxy "
              "serves loopback only unless SIDECAR_PROXY_AUTH is set (then every client must present it). At most one "
              f"such line every {REFUSAL_LOG_EVERY:g}s, each counting the refusals since the last",
              event="connections_refused", reason="not_loopback", refused=count, client=self._remote_last)
