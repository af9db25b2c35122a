"""Refuse clients that reach mitmproxy without passing the front door.

mitmproxy listens on an internal loopback port; every app connection arrives at the front door on
``SIDECAR_LISTEN``, which applies the limits (loopback or proxy credentials, the connection cap, the
head deadline) before it hands a connection over. A local process dialling the internal port directly
is refused here. The decisions themselves live in :mod:`sidecar.proxy.access`.
"""

from __future__ import annotations

import logging

from mitmproxy import connection

from sidecar.logs import event
from sidecar.proxy.access import Access

log = logging.getLogger("egress_sidecar.access")


class ClientAccess:
    def __init__(self, access: Access) -> None:
        self.access = access

    def client_connected(self, client: connection.Client) -> None:
        if client.sockname and (str(client.sockname[0]), int(client.sockname[1])) in self.access.internal_addresses:
            client.error = "refused: connect to SIDECAR_LISTEN, not to the sidecar's internal port"
            event(log, logging.WARNING, "refused a client that connected to mitmproxy's internal port directly; "
                  "apps must use SIDECAR_LISTEN", client_ip=str(client.peername[0]))
        elif not self.access.admits(str(client.peername[0])):
            client.error = "refused: not a loopback client and SIDECAR_PROXY_AUTH is not set"
