"""mitmproxy adapter over the token core, for the traffic mitmproxy serves (plain-HTTP proxy requests
and tunnels to IP literals whose TLS SNI is a token host).

A token call is detected on its head, refused or answered by :class:`sidecar.tokencore.TokenCore`
(which sends it itself, so it never leaves through mitmproxy's own connections), and recorded once
the answer has gone out. Every other request gets its route set explicitly (direct, or the pair with
``SIDECAR_ROUTE=salesforce|all``), because flows on one client connection share a server connection
object: a route left in place would leak onto the next request. Non-token bodies are streamed.
"""

from __future__ import annotations

import time

from mitmproxy import connection, http

from sidecar.destinations import DestinationRefused, Destinations
from sidecar.messages import Answer, TokenRequest
from sidecar.pair import Member, Pair
from sidecar.tokencall import TokenCall
from sidecar.tokencore import CLOSE, TokenCore

CALL = "egress_sidecar.call"  # flow.metadata keys
REQUEST = "egress_sidecar.request"


def route_to(flow: http.HTTPFlow, member: Member | None) -> None:
    """Send this (non-token) flow through ``member`` (None: direct), on a fresh server spec: ``via``
    cannot change on an open connection, and mitmproxy pools connections by (address, TLS, via)."""
    server = connection.Server(address=(flow.request.host, flow.request.port))
    server.via = ("http", member.address.address) if member else None
    flow.server_conn = server


def _answer(answer: Answer) -> http.Response:
    resp = http.Response.make(answer.status, answer.body, answer.headers)
    if answer.reason:
        resp.reason = answer.reason.decode("latin-1")
    return resp


def _declared(req: http.Request) -> int | None:
    lengths = {v.strip() for f in req.headers.get_all("content-length") for v in f.split(",")}
    return int(lengths.pop()) if len(lengths) == 1 and next(iter(lengths)).isdigit() else None


class TokenRoute:
    def __init__(self, core: TokenCore, pair: Pair, destinations: Destinations) -> None:
        self.core = core
        self.pair = pair
        self.destinations = destinations

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        req = flow.request
        host = flow.client_conn.sni or req.host  # where the bytes really go, not the Host header
        call = self.core.detect(host, req.method, req.path, req.timestamp_start)
        if call is None:
            member = self.core.other_member(self.core.hosts.matches(host))
            try:  # a member resolves names itself; direct, this is where the name is resolved
                if member is None:
                    await self.destinations.resolve(req.host, req.port)
                else:
                    self.destinations.check_literal(req.host, req.port)
            except DestinationRefused as exc:
                flow.response = http.Response.make(403, f"egress-sidecar: refused: {exc}\n".encode(),
                                                   {"Content-Type": "text/plain; charset=utf-8"})
                return
            except OSError:
                pass  # does not resolve: mitmproxy answers that itself
            route_to(flow, member)
            req.stream = True
            return
        flow.metadata[CALL] = call
        req.stream = False  # small, and the grant type is needed before routing
        refusal = self.core.refusal(call, req.scheme, _declared(req))
        if refusal is CLOSE:
            flow.metadata.pop(CALL)
            flow.kill()
        elif isinstance(refusal, Answer):
            flow.response = _answer(refusal)
            flow.metadata[REQUEST] = refusal

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if CALL not in flow.metadata and flow.response is not None:
            flow.response.stream = True

    async def request(self, flow: http.HTTPFlow) -> None:
        call: TokenCall | None = flow.metadata.get(CALL)
        if call is None or flow.response is not None:
            return
        req = flow.request
        token_request = TokenRequest(
            flow.client_conn.sni or req.host, req.port, req.method, req.data.path, list(req.headers.fields),
            req.raw_content or b"", req.scheme, address=(req.host, req.port), started=req.timestamp_start)
        answer = await self.core.answer(call, token_request)
        flow.metadata[REQUEST] = (token_request, answer)
        flow.response = _answer(answer)
        if call.client_gone:  # the app left while we waited: mitmproxy will not call `response`
            self.response(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        call: TokenCall | None = flow.metadata.pop(CALL, None)
        if call is None or flow.response is None:
            return
        done = flow.metadata.pop(REQUEST, None)
        if isinstance(done, tuple):
            self.core.finish(call, done[0], done[1])
        elif isinstance(done, Answer):  # refused on its head
            self.core.finish(call, None, done)

    def error(self, flow: http.HTTPFlow) -> None:
        call: TokenCall | None = flow.metadata.get(CALL)
        if call is None:
            return
        if call.in_flight:  # the client left mid-call; the call goes on and is recorded by `request`
            call.client_gone = True
        elif flow.response is not None:  # answered, but the app left before the answer reached it
            self.response(flow)
        else:  # not in flight and no answer: the request never got as far as the sender
            flow.metadata.pop(CALL, None)
            self.core.abandoned(call, None, "the client left before its request was complete: "
                                + (flow.error.msg if flow.error else "no response") + " (nothing was sent)", time.time())

    def http_connect_upstream(self, flow: http.HTTPFlow) -> None:
        """Credentials go on the CONNECT to the member only, never on the inner request."""
        upstream = self.pair.upstream
        if upstream is not None and self.pair.member_at(flow.server_conn.address) is not None:
            flow.request.headers["Proxy-Authorization"] = upstream.proxy_authorization.decode()
