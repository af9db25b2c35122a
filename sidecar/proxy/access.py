"""Who may use the proxy, and how many at once.

Not an open proxy: the sidecar runs next to its app (same pod, dyno or host), so the app connects over
loopback; a client from anywhere else is refused at connect time unless proxy authentication is
required (``SIDECAR_PROXY_AUTH``: every client must then present the credentials). Beyond
``SIDECAR_MAX_CONNECTIONS`` concurrent client connections, new requests get a clear 503.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import logging

from sidecar.net.http1 import Headers, values

log = logging.getLogger("egress_sidecar.access")


def is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


class Access:
    def __init__(self, proxy_auth: str | None, max_connections: int = 1000) -> None:
        self.proxy_auth = proxy_auth.encode() if proxy_auth is not None else None
        self.max_connections = max_connections
        self.active = 0  # client connections open now; counted by the front door, which sees them all

    @property
    def require_auth(self) -> bool:
        return self.proxy_auth is not None

    def admits(self, client_ip: str) -> bool:
        """Whether a client from ``client_ip`` may connect at all (it may still have to authenticate)."""
        return self.require_auth or is_loopback(client_ip)  # (a refusal is counted and logged, throttled, by the addon)

    def authorized(self, headers: Headers) -> bool:
        """Whether a request head carries ``Proxy-Authorization: Basic base64(SIDECAR_PROXY_AUTH)``."""
        if self.proxy_auth is None:
            return True
        found = values(headers, b"proxy-authorization")
        if len(found) != 1:
            return False
        scheme, _, credential = found[0].strip().partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            given = base64.b64decode(credential.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(given, self.proxy_auth)

    @property
    def over_capacity(self) -> bool:
        return self.active > self.max_connections

    def over_capacity_body(self) -> bytes:
        return json.dumps({
            "error": "too_many_connections",
            "error_description": f"egress-sidecar serves at most {self.max_connections} concurrent client "
            "connections (SIDECAR_MAX_CONNECTIONS); retry shortly or raise the limit",
        }).encode()
