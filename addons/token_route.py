"""Detect token calls on intercepted connections, route them through the pair, and record them.

The flow of one token call: ``requestheaders`` (detect; keep the small body buffered) → ``request``
(grant type; the guard chooses a member or blocks; :mod:`sidecar.upstream` sends it through that
member, failing over while nothing has been sent) → ``response`` (classify) → one
:class:`~sidecar.tokencall.TokenCall` to the recorder.

Every other request on an intercepted connection gets its route set explicitly too (direct, or the
pair with ``SIDECAR_ROUTE=salesforce|all``), because flows on one client connection share a server
connection object: a route left in place would leak onto the next request. Non-token bodies are
streamed, never held whole.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from mitmproxy import connection, http

from sidecar.guard import Decision, Guard
from sidecar.hosts import TokenHosts
from sidecar.logs import event
from sidecar.metrics import EGRESS_NONE, EGRESS_UNKNOWN, MEMBER_DIRECT, MEMBER_NONE, Metrics
from sidecar.pair import Member, Pair
from sidecar.record import Recorder
from sidecar.tokencall import TokenCall, classify_response, grant_type, host_class, is_token_request
from sidecar.upstream import SendResult, TokenSender

MAX_TOKEN_REQUEST_BYTES = 64 * 1024  # a token request is a few hundred bytes of form fields
# Beyond this declared size the connection is closed at once instead of reading the body to answer 413.
MAX_TOKEN_REQUEST_READ = 1024 * 1024

log = logging.getLogger("egress_sidecar.route")
CALL = "egress_sidecar.call"  # flow.metadata key of the TokenCall


def route_to(flow: http.HTTPFlow, member: Member | None) -> None:
    """Send this flow through ``member`` (None: direct).

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
        on_call: Callable[[TokenCall, http.HTTPFlow], None] | None = None,
    ) -> None:
        self.pair = pair
        self.guard = guard
        self.hosts = hosts
        self.recorder = recorder
        self.route_mode = route_mode
        self.sender = sender
        self.metrics = metrics
        self.on_call = on_call  # extra observers (refresh token hygiene)

    # -- detect -------------------------------------------------------------------------------
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:  # answered already (over capacity)
            return
        req = flow.request
        on_token_host = req.scheme == "https" and self.hosts.matches(req.pretty_host)
        if on_token_host and is_token_request(req.method, req.path):
            flow.metadata[CALL] = TokenCall(
                started=req.timestamp_start, host_class=host_class(req.pretty_host), grant_type="other"
            )
            req.stream = False  # small, and the grant type is needed before routing
            declared = req.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_TOKEN_REQUEST_READ:
                event(log, logging.WARNING, f"closed a client sending a {declared}-byte token request",
                      limit=MAX_TOKEN_REQUEST_BYTES)
                flow.metadata.pop(CALL, None)
                flow.kill()
                return
            if declared.isdigit() and int(declared) > MAX_TOKEN_REQUEST_BYTES:
                self._refuse(flow, 413, "token_request_too_large",
                             f"token request body of {declared} bytes exceeds {MAX_TOKEN_REQUEST_BYTES}")
            return
        route_to(flow, self._other_member(on_token_host))
        req.stream = True

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if CALL not in flow.metadata and flow.response is not None:
            flow.response.stream = True

    # -- route and send -----------------------------------------------------------------------
    async def request(self, flow: http.HTTPFlow) -> None:
        call: TokenCall | None = flow.metadata.get(CALL)
        if call is None or flow.response is not None:
            return
        req = flow.request
        body = req.raw_content or b""
        if len(body) > MAX_TOKEN_REQUEST_BYTES:
            self._refuse(flow, 413, "token_request_too_large",
                         f"token request body of {len(body)} bytes exceeds {MAX_TOKEN_REQUEST_BYTES}")
            return
        call.grant_type = grant_type(req.headers.get("content-type"), body)
        decision = self.guard.choose(call.grant_type)
        call.guard = decision.verdict
        if decision.blocked:
            call.route, call.member, call.egress_ip = "blocked", MEMBER_NONE, EGRESS_NONE
            call.outcome = "blocked"
            call.detail = decision.reason
            flow.response = blocked_response(self.guard, decision.reason or "")
            return
        self._describe_route(call, decision.member)
        self._warn_if_not_allowlisted(call, decision)
        grant = call.grant_type

        def next_member(tried: list[Member]) -> Member | None:
            return self.guard.choose(grant, exclude=tuple(tried)).member

        result = await self.sender.send(req, decision.member, next_member)
        self._after_send(flow, call, decision, result)

    def _describe_route(self, call: TokenCall, member: Member | None) -> None:
        if member is None:
            call.route, call.member, call.egress_ip = "direct", MEMBER_DIRECT, EGRESS_UNKNOWN
        else:
            call.route, call.member = "pair", member.label
            call.egress_ip = member.egress_ip or EGRESS_UNKNOWN

    def _after_send(self, flow: http.HTTPFlow, call: TokenCall, decision: Decision, result: SendResult) -> None:
        call.attempts = [a.member.label if a.member else MEMBER_DIRECT for a in result.attempts]
        if len(result.attempts) > 1:
            self.metrics.failovers.inc(len(result.attempts) - 1)
            self._describe_route(call, result.member)
            if result.member is not None:
                call.guard = self.guard.verdict_for(result.member, call.grant_type)
        if result.response is not None:
            flow.response = result.response
            return
        call.outcome = "upstream_error"
        call.detail = result.detail
        if result.sent:
            self._refuse(
                flow, 502, "upstream_failed_after_send",
                f"the token request was sent ({_via(call)}) but no complete answer came back: {result.detail}. "
                "It was not retried, because Salesforce rotates refresh tokens and the request may have been "
                "processed; if it was a refresh, the app's stored refresh token may now be stale.",
                sent="unknown", outcome_set=True,
            )
        else:
            tried = ", ".join(call.attempts)
            self._refuse(
                flow, 502, "upstream_unreachable",
                f"no byte of the token request was sent (tried {tried}): {result.detail}. It is safe to retry.",
                sent=False, outcome_set=True,
            )

    def _refuse(self, flow: http.HTTPFlow, status: int, error: str, description: str,
                sent: bool | str = False, outcome_set: bool = False) -> None:
        call: TokenCall | None = flow.metadata.get(CALL)
        if call is not None and not outcome_set:
            call.outcome, call.detail = "client_error", description
            call.local = True
        elif call is not None:
            call.local = True
        body = {"error": error, "error_description": "egress-sidecar: " + description, "sent_to_salesforce": sent}
        flow.response = http.Response.make(
            status, json.dumps(body).encode(), {"Content-Type": "application/json", "X-Egress-Sidecar": error}
        )

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

    def _other_member(self, on_token_host: bool) -> Member | None:
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
        resp = flow.response
        if call.outcome != "blocked" and not call.local:
            classified = classify_response(resp.status_code, resp.get_content(strict=False) or b"")
            call.outcome, call.error_code = classified.outcome, classified.error_code
        call.status = resp.status_code
        call.duration = max(0.0, (resp.timestamp_end or time.time()) - call.started)
        self._finish(call, flow)

    def error(self, flow: http.HTTPFlow) -> None:
        call: TokenCall | None = flow.metadata.pop(CALL, None)
        if call is None:
            return
        call.outcome = "upstream_error"
        call.detail = _safe_error(flow)
        call.duration = max(0.0, time.time() - call.started)
        self._finish(call, flow)

    def _finish(self, call: TokenCall, flow: http.HTTPFlow) -> None:
        self.recorder.record(call)
        if self.on_call is not None:
            self.on_call(call, flow)


def _via(call: TokenCall) -> str:
    return f"via pair member {call.member}" if call.route == "pair" else "direct"


def _safe_error(flow: http.HTTPFlow) -> str:
    msg = flow.error.msg if flow.error else "no response"
    return msg[:300]


def blocked_response(guard: Guard, reason: str) -> http.Response:
    body: dict[str, Any] = {
        "error": "egress_not_allowlisted",
        "error_description": "egress-sidecar refused to send this token call: " + reason,
        "missing_from_allowlist": guard.missing_ips(),
        "pair": [
            {
                "member": m.label,
                "egress_ip": m.egress_ip,
                "allowlisted": guard.is_allowlisted(m.egress_ip),
                "up": m.up,
            }
            for m in guard.pair.members
        ],
        "sent_to_salesforce": False,
    }
    return http.Response.make(
        503,
        json.dumps(body, indent=None).encode(),
        {"Content-Type": "application/json", "X-Egress-Sidecar": "blocked", "Retry-After": "30"},
    )
