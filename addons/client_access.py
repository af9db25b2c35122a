"""Not an open proxy: without SIDECAR_PROXY_AUTH only loopback clients are served.

The sidecar runs next to its app (same pod, dyno or host), so the app connects over loopback. A
client from anywhere else is refused at connect time unless proxy authentication is required
(mitmproxy's ``proxyauth`` then asks every client for the credentials).
"""

from __future__ import annotations

import ipaddress
import logging

from mitmproxy import connection

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
    def __init__(self, require_auth: bool) -> None:
        self.require_auth = require_auth

    def client_connected(self, client: connection.Client) -> None:
        if self.require_auth or is_loopback(str(client.peername[0])):
            return
        client.error = "refused: not a loopback client and SIDECAR_PROXY_AUTH is not set"
        event(
            log,
            logging.WARNING,
            "refused a proxy client that is not on loopback; set SIDECAR_PROXY_AUTH=user:pass to serve "
            "other hosts (they must then authenticate)",
            client_ip=str(client.peername[0]),
        )
