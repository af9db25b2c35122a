"""Intercept TLS only for Salesforce token hosts; relay every other tunnel as raw bytes.

Which hosts are intercepted is mitmproxy's ``allow_hosts`` (set by the service from
``SIDECAR_TOKEN_HOSTS``); everything else becomes an ignored TCP layer: never decrypted, never
buffered. This addon counts those tunnels and, with ``SIDECAR_ROUTE=all``, sends them through a pair
member instead of direct; it also counts client TLS handshakes that fail (an app that does not trust the
sidecar's CA).
"""

from __future__ import annotations

from collections.abc import Callable

from mitmproxy import tls
from mitmproxy.proxy import layer, layers
from mitmproxy.proxy.layers.http._upstream_proxy import HttpUpstreamProxy

from sidecar.metrics import Metrics
from sidecar.pair import Member
from sidecar.streams import handshake_failure


class SelectiveIntercept:
    def __init__(self, metrics: Metrics, passthrough_member: Callable[[], Member | None]) -> None:
        self.metrics = metrics
        self.passthrough_member = passthrough_member

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        chosen = nextlayer.layer
        if not (isinstance(chosen, layers.TCPLayer) and chosen.flow is None):  # ignored = not intercepted
            return
        member = self.passthrough_member()
        if member is None:
            self.metrics.tunnels.labels("direct").inc()
            return
        # Same stack mitmproxy's upstream mode builds after a CONNECT: the raw relay rides a
        # CONNECT tunnel through the member (credentials are added in http_connect_upstream).
        ctx = nextlayer.context
        ctx.server.via = ("http", member.address.address)
        stack = HttpUpstreamProxy.make(ctx, True)
        stack /= layers.TCPLayer(ctx, ignore=True)
        nextlayer.layer = stack[0]
        self.metrics.tunnels.labels("pair").inc()

    def tls_established_client(self, data: tls.TlsData) -> None:
        self.metrics.intercepted.inc()

    def tls_failed_client(self, data: tls.TlsData) -> None:
        self.metrics.client_tls_failed(handshake_failure(data.conn.error or ""))

