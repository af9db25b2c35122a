"""Detect token calls on intercepted connections, route them through the pair, and record them.

The flow of one token call: ``requestheaders`` (detect; keep the small body buffered) → ``request``
(grant type; the guard chooses a member or blocks; :mod:`sidecar.upstream` sends it through that
member, failing over while nothing has been sent) → ``response`` (classify) → one
:class:`~sidecar.tokencall.TokenCall` to the recorder.

A detected token call always ends with a response set by this addon: mitmproxy never gets to send it
on its own connection (which would bypass the guard, and could send a refresh a second time).

Every other request on an intercepted connection gets its route set explicitly too (direct, or the
pair with ``SIDECAR_ROUTE=salesforce|all``), because flows on one client connection share a server
connection object: a route left in place would leak onto the next request. Non-token bodies are
streamed, never held whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

from mitmproxy import connection, http

from sidecar import responses
from sidecar.guard import Decision, Guard
from sidecar.hosts import TokenHosts
from sidecar.logs import event
from sidecar.metrics import (
    EGRESS_NONE,
    EGRESS_UNKNOWN,
    MEMBER_DIRECT,
    MEMBER_NONE,
    Metrics,
)
from sidecar.pair import Member, Pair
from sidecar.record import Recorder
from sidecar.tokencall import (
    TokenCall,
    classify_response,
    grant_type,
    host_class,
    is_token_request,
)
from sidecar.upstream import SendResult, TokenSender

log = logging.getLogger("egress_sidecar.route")
CALL = "egress_sidecar.call"  # flow.metadata key of the TokenCall
MAX_TOKEN_REQUEST_BYTES = 64 * 1024  # a token request is a few hundred bytes of form fields
# Beyond this declared size the connection is closed at once instead of reading the body to answer 413.
MAX_TOKEN_REQUEST_READ = 1024 * 1024


class Close:
    """Close the client connection without an answer (see TokenRoute.refusal)."""


CLOSE = Close()


class Exchange(NamedTuple):
    """A finished token call's request and response, as the observers (grant tracking) see it."""

    request: http.Request
    response: http.Response | None


def route_to(flow: http.HTTPFlow, member: Member | None) -> None:
    """Send this (non-token) flow through ``member`` (None: direct).

    ``via`` cannot change on an open connection, so the flow gets a fresh server spec; mitmproxy then
    takes a pooled connection with the same (address, TLS, via) or opens one, so keep-alive
    connections per member are reused and direct and per-member connections never mix.
    """
    server = connection.Server(address=(flow.request.host, flow.request.port))
    server.via = ("http", member.address.address) if member else None
    flow.server_conn = server


class TokenRoute:
    def __init__(
        self,
        pair: Pair,
        guard: Guard,
        hosts: TokenHosts,
        recorder: Recorder,
        route_mode: str,
        sender: TokenSender,
        metrics: Metrics,
        on_call: Callable[[TokenCall, Exchange], None] | None = None,
    ) -> None:
        self.pair = pair
        self.guard = guard
        self.hosts = hosts
        self.recorder = recorder
        self.route_mode = route_mode
        self.sender = sender
        self.metrics = metrics
        self.on_call = on_call  # extra observers (refresh token hygiene)
        self.in_flight = 0  # token calls being routed and sent right now (shutdown waits for them)

    # -- detect -------------------------------------------------------------------------------
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:  # answered already (over capacity)
            return
        req = flow.request
        call = self.detect(req)
        if call is not None:
            flow.metadata[CALL] = call
            req.stream = False  # small, and the grant type is needed before routing
            refusal = self.refusal(req, call)
            if isinstance(refusal, http.Response):
                flow.response = refusal
            elif refusal is CLOSE:
                flow.metadata.pop(CALL, None)
                flow.kill()
            return
        route_to(flow, self.other_member(self.hosts.matches(req.host)))
        req.stream = True

    def detect(self, req: http.Request) -> TokenCall | None:
        """A new TokenCall when ``req`` (its head) is a token call to a token host, else None."""
        # Where the bytes really go (the CONNECT target / SNI), not what the Host header claims.
        if self.hosts.matches(req.host) and is_token_request(req.method, req.path):
            return TokenCall(started=req.timestamp_start, host_class=host_class(req.host), grant_type="other")
        return None

    def refusal(self, req: http.Request, call: TokenCall) -> http.Response | Close | None:
        """Look at a token call's head before its body is read: a local answer for a call that must not
        be sent (the connection is closed after it: the body is left unread), CLOSE for one whose
        declared body is too large even to read, None for one to go on with."""
        declared = _declared_length(req.headers)
        if req.scheme != "https":
            return self._answer(call, 400, "token_call_not_https",
                                "token calls must use https://; this one was not sent anywhere")
        if declared is not None and declared > MAX_TOKEN_REQUEST_READ:
            event(log, logging.WARNING, f"closed a client sending a {declared}-byte token request",
                  limit=MAX_TOKEN_REQUEST_BYTES)
            return CLOSE
        if declared is not None and declared > MAX_TOKEN_REQUEST_BYTES:
            return self._answer(call, 413, "token_request_too_large",
                                f"token request body of {declared} bytes exceeds {MAX_TOKEN_REQUEST_BYTES}")
        if declared is None and "chunked" in req.headers.get("transfer-encoding", "").lower():
            # The size of a chunked body is only known once it has all been read into memory.
            return self._answer(call, 411, "token_request_length_required",
                                "send token requests with a Content-Length (not chunked)")
        return None

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if CALL not in flow.metadata and flow.response is not None:
            flow.response.stream = True

    # -- route and send -----------------------------------------------------------------------
    async def request(self, flow: http.HTTPFlow) -> None:
        call: TokenCall | None = flow.metadata.get(CALL)
        if call is None or flow.response is not None:
            return
        flow.response = await self.answer(flow.request, call)
        if call.client_gone:  # the app left while we waited: mitmproxy will not call `response`
            self.response(flow)

    async def answer(self, req: http.Request, call: TokenCall) -> http.Response:
        """Route and send one token call (its body read); always returns the answer for the app."""
        call.in_flight = True
        self.in_flight += 1
        try:
            return await self._route_and_send(req, call)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - never let a token call go out any other way
            event(log, logging.ERROR, f"token call failed inside the sidecar ({type(exc).__name__})")
            call.outcome, call.local = "upstream_error", True
            return responses.failed_after_send(_via(call), "an internal error in the sidecar")
        finally:
            call.in_flight = False
            self.in_flight -= 1

    async def _route_and_send(self, req: http.Request, call: TokenCall) -> http.Response:
        body = req.raw_content or b""
        if len(body) > MAX_TOKEN_REQUEST_BYTES:
            return self._answer(call, 413, "token_request_too_large",
                                f"token request body of {len(body)} bytes exceeds {MAX_TOKEN_REQUEST_BYTES}")
        call.grant_type = grant_type(req.headers.get("content-type"), req.get_content(strict=False) or b"",
                                     req.path.partition("?")[2])
        decision = self.guard.choose(call.grant_type)
        call.guard = decision.verdict
        if decision.blocked:
            call.route, call.member, call.egress_ip = "blocked", MEMBER_NONE, EGRESS_NONE
            call.outcome, call.detail, call.local = "blocked", decision.reason, True
            return responses.blocked(self.guard, decision.reason or "")
        self._describe_route(call, decision.member)
        self._warn_if_not_allowlisted(call, decision)
        grant = call.grant_type

        def next_member(tried: list[Member]) -> Member | None:
            return self.guard.choose(grant, exclude=tuple(tried)).member

        result = await self.sender.send(req, decision.member, next_member)
        return self._after_send(call, result)

    def _describe_route(self, call: TokenCall, member: Member | None) -> None:
        if member is None:
            call.route, call.member, call.egress_ip = "direct", MEMBER_DIRECT, EGRESS_UNKNOWN
        else:
            call.route, call.member = "pair", member.label
            call.egress_ip = member.egress_ip or EGRESS_UNKNOWN

    def _after_send(self, call: TokenCall, result: SendResult) -> http.Response:
        call.attempts = [a.member.label if a.member else MEMBER_DIRECT for a in result.attempts]
        if len(result.attempts) > 1:
            self.metrics.failovers.inc(len(result.attempts) - 1)
            self._describe_route(call, result.member)
            if result.member is not None:
                call.guard = self.guard.verdict_for(result.member, call.grant_type)
        if result.response is not None:
            return result.response
        call.outcome, call.detail, call.local = "upstream_error", result.detail, True
        if result.sent:
            return responses.failed_after_send(_via(call), result.detail or "")
        return responses.unreachable(call.attempts, result.detail or "")

    def _answer(self, call: TokenCall, status: int, error: str, description: str) -> http.Response:
        """Refuse a malformed token call without sending it anywhere."""
        _mark_refused(call, description)
        return responses.local_answer(status, error, description)

    def _warn_if_not_allowlisted(self, call: TokenCall, decision: Decision) -> None:
        if decision.verdict == "not_allowlisted":
            event(
                log,
                logging.WARNING,
                f"token call leaves from {call.egress_ip}, which is not on SIDECAR_ALLOWLIST "
                "(guard observes; SIDECAR_GUARD=enforce would route around it)",
                member=call.member,
                egress_ip=call.egress_ip,
            )

    def other_member(self, on_token_host: bool) -> Member | None:
        """The route of anything that is not a token call: direct unless SIDECAR_ROUTE says otherwise."""
        if self.pair.direct:
            return None
        if self.route_mode == "all" or (self.route_mode == "salesforce" and on_token_host):
            return self.guard.choose("other").member
        return None

    def http_connect_upstream(self, flow: http.HTTPFlow) -> None:
        """Credentials go on the CONNECT to the member only, never on the inner request."""
        upstream = self.pair.upstream
        if upstream is not None and self.pair.member_at(flow.server_conn.address) is not None:
            flow.request.headers["Proxy-Authorization"] = upstream.proxy_authorization.decode()

    # -- classify and record ------------------------------------------------------------------
    def response(self, flow: http.HTTPFlow) -> None:
        call: TokenCall | None = flow.metadata.pop(CALL, None)
        if call is None or flow.response is None:
            return
        self.finish(call, flow.request, flow.response)

    def finish(self, call: TokenCall, req: http.Request, resp: http.Response) -> None:
        """Classify the answer the app got and record the call, just after the answer went out."""
        if not call.local:
            classified = classify_response(resp.status_code, resp.get_content(strict=False) or b"")
            call.outcome, call.error_code = classified.outcome, classified.error_code
        call.status = resp.status_code
        call.duration = max(0.0, (resp.timestamp_end or time.time()) - call.started)
        self._finish_soon(call, Exchange(req, resp))

    def error(self, flow: http.HTTPFlow) -> None:
        call: TokenCall | None = flow.metadata.get(CALL)
        if call is None:
            return
        if call.in_flight:  # the client left mid-call; the call itself goes on and is recorded by `request`
            call.client_gone = True
            return
        if flow.response is not None:
            # The call completed (Salesforce answered, or we did) but the app left before the answer
            # reached it; record what really happened, or a rotation would go unseen.
            self.response(flow)
            return
        flow.metadata.pop(CALL, None)
        # Not in flight and no answer: the request never got as far as the sender.
        self.abandoned(call, flow.request, "the client left before its request was complete: "
                       + (flow.error.msg if flow.error else "no response") + " (nothing was sent)")

    def abandoned(self, call: TokenCall, req: http.Request, detail: str) -> None:
        """Record a token call whose client left (or stalled) before its whole request arrived: nothing
        was sent anywhere, so it is the client's error, not the upstream's."""
        _mark_refused(call, detail[:300])
        call.duration = max(0.0, time.time() - call.started)
        self._finish_soon(call, Exchange(req, None))

    def _finish_soon(self, call: TokenCall, exchange: Exchange) -> None:
        """Record right after the answer has been passed on: the app does not wait for the log line,
        the metrics and refresh token tracking (a few tenths of a millisecond per call)."""
        asyncio.get_running_loop().call_soon(self._finish, call, exchange)

    def _finish(self, call: TokenCall, exchange: Exchange) -> None:
        try:
            self.recorder.record(call)
            if self.on_call is not None:
                self.on_call(call, exchange)
        except Exception as exc:  # noqa: BLE001 - recording must never break the proxy
            event(log, logging.ERROR, f"recording a token call failed ({type(exc).__name__})")


def _mark_refused(call: TokenCall, detail: str) -> None:
    """A token call that was not sent anywhere because of the client (a refusal, or it left)."""
    call.route, call.member, call.egress_ip = "refused", MEMBER_NONE, EGRESS_NONE
    call.outcome, call.detail, call.local = "client_error", detail, True


def _declared_length(headers: http.Headers) -> int | None:
    """The declared body length: one value, also when repeated ("5, 5" is valid HTTP); else None."""
    values = {v.strip() for field in headers.get_all("content-length") for v in field.split(",")}
    if len(values) == 1 and (value := values.pop()).isdigit():
        return int(value)
    return None


def _via(call: TokenCall) -> str:
    return f"via pair member {call.member}" if call.route == "pair" else "direct"
