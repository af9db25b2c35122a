"""mitmproxy's part: plain proxy requests that are not token calls (``GET http://host/...`` sent to the
proxy without a CONNECT). The front door serves every CONNECT and every token call itself; it hands
mitmproxy the rest, one request per connection.

For each request this addon sets the route explicitly (direct, or a pair member with
``SIDECAR_ROUTE=salesforce|all``: flows on one client connection share a server connection object, so a
route left in place would leak onto the next request), checks the destination rules on the resolved
address, and streams both bodies (never buffered). Each answer closes the client connection, so the
app's next request arrives at the front door again: its head is read there, under the same deadline and
size cap as every other, and a token call among them is never served by mitmproxy.
"""

from __future__ import annotations

from mitmproxy import connection, http

from sidecar.egress.pair import Member, Pair
from sidecar.proxy.destinations import DestinationRefused, Destinations
from sidecar.token.core import TokenCore


def route_to(flow: http.HTTPFlow, member: Member | None) -> None:
    """Send this flow through ``member`` (None: direct), on a fresh server spec: ``via`` cannot change
    on an open connection, and mitmproxy pools connections by (address, TLS, via)."""
    server = connection.Server(address=(flow.request.host, flow.request.port))
    server.via = ("http", member.address.address) if member else None
    flow.server_conn = server


class PlainHttp:
    def __init__(self, core: TokenCore, pair: Pair, destinations: Destinations) -> None:
        self.core = core
        self.pair = pair
        self.destinations = destinations

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        req = flow.request
        member = self.core.other_member(self.core.hosts.matches(req.host))
        try:  # checked by the front door already; again here, in case the route changed since
            await self.destinations.check_route(req.host, req.port, member is not None)
        except DestinationRefused as exc:
            flow.response = http.Response.make(403, f"egress-sidecar: refused: {exc}\n".encode(),
                                               {"Content-Type": "text/plain; charset=utf-8"})
            return
        except OSError:
            pass  # does not resolve: mitmproxy answers that itself
        route_to(flow, member)
        req.stream = True

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Every answer, the sidecar's own 403 included (mitmproxy calls this hook for those too)."""
        if flow.response is not None:
            flow.response.stream = True
            flow.response.headers["Connection"] = "close"  # the next request comes through the front door

    def http_connect_upstream(self, flow: http.HTTPFlow) -> None:
        """Credentials go on the CONNECT to the member only, never on the inner request."""
        upstream = self.pair.upstream
        if upstream is not None and self.pair.member_at(flow.server_conn.address) is not None:
            flow.request.headers["Proxy-Authorization"] = upstream.proxy_authorization.decode()
