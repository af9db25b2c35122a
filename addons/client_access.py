"""Who may use the proxy, and how many at once.

Not an open proxy: the sidecar runs next to its app (same pod, dyno or host), so the app connects over
loopback; a client from anywhere else is refused at connect time unless proxy authentication is
required (mitmproxy's ``proxyauth`` then asks every client for the credentials). Beyond
SIDECAR_MAX_CONNECTIONS concurrent client connections, new requests get a clear 503.
"""

from __future__ import annotations

import ipaddress
import json
import logging

from mitmproxy import connection, http

from sidecar.logs import event

log = logging.getLogger("egress_sidecar.access")


def is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


class ClientAccess:
    def __init__(self, require_auth: bool, max_connections: int = 1000) -> None:
        self.require_auth = require_auth
        self.max_connections = max_connections
        self.active = 0  # client connections open now; counted by the front door, which sees them all
        # mitmproxy's own listener (an internal loopback port): clients must come through the front
        # door, which counts them and applies the limits; a local process dialling the internal port
        # directly is refused.
        self.internal_addresses: set[tuple[str, int]] = set()

    def over_capacity_body(self) -> bytes:
        return json.dumps({
            "error": "too_many_connections",
            "error_description": f"egress-sidecar serves at most {self.max_connections} concurrent client "
            "connections (SIDECAR_MAX_CONNECTIONS); retry shortly or raise the limit",
        }).encode()

    def _over_capacity(self, flow: http.HTTPFlow) -> None:
        if self.active <= self.max_connections or flow.response is not None:
            return
        flow.response = http.Response.make(
            503, self.over_capacity_body(), {"Content-Type": "application/json", "Retry-After": "1"})

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._over_capacity(flow)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._over_capacity(flow)

    def client_connected(self, client: connection.Client) -> None:
        if client.sockname and (str(client.sockname[0]), int(client.sockname[1])) in self.internal_addresses:
            client.error = "refused: connect to SIDECAR_LISTEN, not to the sidecar's internal port"
            event(log, logging.WARNING, "refused a client that connected to mitmproxy's internal port directly; "
                  "apps must use SIDECAR_LISTEN", client_ip=str(client.peername[0]))
            return
        if self.require_auth or is_loopback(str(client.peername[0])):
            return
        client.error = "refused: not a loopback client and SIDECAR_PROXY_AUTH is not set"
        self.refuse(str(client.peername[0]))

    def refuse(self, client_ip: str) -> None:
        event(
            log,
            logging.WARNING,
            "refused a proxy client that is not on loopback; set SIDECAR_PROXY_AUTH=user:pass to serve "
            "other hosts (they must then authenticate)",
            client_ip=client_ip,
        )
