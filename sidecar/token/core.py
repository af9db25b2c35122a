"""A token call's whole journey, once, for every engine: detect → refuse → route (the guard) → send →
classify → record.

The engine that serves token calls (the token lane, for every way a token call arrives) is a thin
adapter: it turns its own request into a :class:`~sidecar.token.messages.TokenRequest`, calls
:meth:`TokenCore.refusal` on its head and :meth:`TokenCore.answer` on the whole request, writes the
:class:`~sidecar.token.messages.Answer` back and calls :meth:`TokenCore.finish`. Nothing here knows an
engine's types.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Callable

from sidecar.egress.evidence import App, Evidence
from sidecar.egress.guard import Guard
from sidecar.egress.pair import Member, Pair
from sidecar.logs import event
from sidecar.metrics import (
    EGRESS_NONE,
    EGRESS_UNKNOWN,
    MEMBER_DIRECT,
    MEMBER_NONE,
    Metrics,
)
from sidecar.net.http1 import first
from sidecar.ops.record import Recorder
from sidecar.token import answers as responses
from sidecar.token.call import (
    ALLOWLISTED_GRANTS,
    TokenCall,
    classify_response,
    client_id,
    grant_of,
    host_class,
    is_token_request,
    subject_to_allowlist,
)
from sidecar.token.hosts import TokenHosts
from sidecar.token.messages import Answer, TokenRequest
from sidecar.token.sender import SendResult, TokenSender, Unsendable
from sidecar.token.shield import Contended, SharedStateDown, Shield, request_key

log = logging.getLogger("egress_sidecar.route")
MAX_TOKEN_REQUEST_BYTES = 64 * 1024  # a token request is a few hundred bytes of form fields
# Beyond this declared size the connection is closed at once instead of reading the body to answer 413.
MAX_TOKEN_REQUEST_READ = 1024 * 1024

Observer = Callable[[TokenCall, TokenRequest | None, Answer | None], None]


class Close:
    """Close the client connection without an answer (see TokenCore.refusal)."""


CLOSE = Close()


class TokenCore:
    def __init__(self, pair: Pair, guard: Guard, hosts: TokenHosts, recorder: Recorder, route_mode: str,
                 sender: TokenSender, metrics: Metrics, evidence: Evidence, *, retry_ip_restricted: bool = False,
                 shield: Shield | None = None, observers: tuple[Observer, ...] = ()) -> None:
        self.shield = shield  # one redemption per refresh token (coalescing, replay)
        self.pair = pair
        self.guard = guard
        self.evidence = evidence
        self.retry_ip_restricted = retry_ip_restricted
        self.hosts = hosts
        self.recorder = recorder
        self.route_mode = route_mode
        self.sender = sender
        self.metrics = metrics
        self.observers = observers  # extra observers of finished calls (refresh token hygiene)
        self.in_flight = 0  # token calls being routed and sent right now (shutdown waits for them)

    # -- detect and refuse (the head) ---------------------------------------------------------
    def detect(self, host: str, method: str, path: str, started: float) -> TokenCall | None:
        """A new TokenCall when this is a token call to a token host, else None. ``host`` is where the
        bytes really go (the CONNECT target or TLS SNI), not what the Host header claims."""
        if self.hosts.matches(host) and is_token_request(method, path):
            return TokenCall(started=started, host_class=host_class(host), grant_type="other")
        return None

    def refusal(self, call: TokenCall, scheme: str, declared: int | None) -> Answer | Close | None:
        """Look at a token call's head before its body is read: a local answer for a call that must not
        be sent (the connection is closed after it: the body is left unread), CLOSE for one whose
        declared body is too large even to read, None for one to go on with. ``declared``: the
        Content-Length (None for a chunked body: the reader stops at MAX_TOKEN_REQUEST_BYTES)."""
        if scheme != "https":
            return self._refuse(call, 400, "token_call_not_https",
                                "token calls must use https://; this one was not sent anywhere")
        if declared is not None and declared > MAX_TOKEN_REQUEST_READ:
            event(log, logging.WARNING, f"closed a client sending a {declared}-byte token request",
                  limit=MAX_TOKEN_REQUEST_BYTES)
            return CLOSE
        if declared is not None and declared > MAX_TOKEN_REQUEST_BYTES:
            return self.too_large(call, declared)
        return None

    def too_large(self, call: TokenCall, size: int | None = None) -> Answer:
        """The answer for a token request body over the cap (declared, or found while reading a chunked one)."""
        what = f"of {size} bytes" if size is not None else "(chunked)"
        return self._refuse(call, 413, "token_request_too_large",
                            f"token request body {what} exceeds {MAX_TOKEN_REQUEST_BYTES} bytes")

    # -- route and send -----------------------------------------------------------------------
    async def answer(self, call: TokenCall, req: TokenRequest) -> Answer:
        """Route and send one token call (its body read); always returns the answer for the app."""
        call.in_flight = True
        self.in_flight += 1
        try:
            return await self._route_and_send(call, req)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - never let a token call go out any other way
            event(log, logging.ERROR, f"token call failed inside the sidecar ({type(exc).__name__}: {exc})"[:300])
            log.debug("token call failed: %s", traceback.format_exc())
            call.outcome, call.local = "upstream_error", True
            return responses.failed_after_send(_via(call), "an internal error in the sidecar")
        finally:
            call.in_flight = False
            self.in_flight -= 1

    async def _route_and_send(self, call: TokenCall, req: TokenRequest) -> Answer:
        if len(req.body) > MAX_TOKEN_REQUEST_BYTES:
            return self.too_large(call, len(req.body))
        fields = req.fields()
        call.grant_type = grant_of(fields)
        authorization = first(req.headers, b"authorization")
        app = self.evidence.app(client_id(fields, authorization.decode("latin-1") if authorization else None))
        call.app = app.label if app else None
        shield = self.shield
        if call.grant_type == "refresh_token" and shield is not None and shield.hash_key is not None:
            key = request_key(shield.hash_key, fields, authorization.decode("latin-1") if authorization else None,
                              req.host)
            try:
                answer, how = await shield.redeem(key, lambda: self._guarded(call, req, app))
            except Contended:
                answer, how = responses.redemption_in_flight(), "coalesced"
            except SharedStateDown:
                answer, how = responses.redis_unreachable(), "coalesced"
            if how != "sent":  # another call's answer: nothing of this one was sent
                call.shielded = how
                call.route, call.member, call.egress_ip, call.guard = how, MEMBER_NONE, EGRESS_NONE, "allow"
                call.outcome = responses.local_outcome(answer)  # (None: Salesforce's answer, classified in finish)
                call.local = call.outcome is not None
            return answer
        return await self._guarded(call, req, app)

    async def _guarded(self, call: TokenCall, req: TokenRequest, app: App | None) -> Answer:
        """The guard's choice, then the send (and, once, the retry of an "ip restricted" refusal)."""
        decision = self.guard.choose(call.grant_type, app=app)
        call.guard = decision.verdict
        if decision.blocked:
            call.route, call.member, call.egress_ip = "blocked", MEMBER_NONE, EGRESS_NONE
            call.outcome, call.detail, call.local = "blocked", decision.reason, True
            return responses.blocked(self.guard, decision.reason or "")
        self._describe_route(call, decision.member)
        try:
            return await self._send_and_retry(call, req, decision.member, app)
        except Unsendable as exc:
            return self._refuse(call, 400, "token_request_malformed",
                                f"the token request cannot be sent as HTTP/1.1 ({exc}); it was not sent anywhere")

    async def _send_and_retry(self, call: TokenCall, req: TokenRequest, member: Member | None,
                              app: App | None) -> Answer:
        grant = call.grant_type

        def next_member(tried: list[Member]) -> Member | None:
            return self.guard.choose(grant, app=app, exclude=tuple(tried)).member

        result = await self.sender.send(req, member, next_member)
        answer = self._after_send(call, result, app)
        if result.answer is None or result.member is None:
            return answer
        self._learn(call, app, result.member, answer)
        if not (self.retry_ip_restricted and call.outcome == "ip_restricted" and subject_to_allowlist(grant)):
            return answer
        # Salesforce refused the redemption because of the IP: nothing was redeemed, so the same call may
        # go once more, through an IP it has not refused for this app. Never for any other answer.
        refused = result.member

        def retry_next(tried: list[Member]) -> Member | None:
            return self.guard.retry_member(app, refused, exclude=tuple(tried))

        other = retry_next([])
        if other is None:
            return answer
        first_answer, first_route = answer, (call.route, call.member, call.egress_ip, call.guard)
        call.retried_from = (call.member, call.egress_ip)
        retry = await self.sender.send(req, other, retry_next)
        if retry.answer is None and not retry.sent:  # the retry never reached Salesforce: its refusal stands
            self.metrics.ip_restricted_retries.labels("upstream_error").inc()
            call.retried_from = None
            call.route, call.member, call.egress_ip, call.guard = first_route
            call.detail = f"a retry through another egress IP could not be sent: {retry.detail}"
            return first_answer
        answer = self._after_send(call, retry, app)
        if retry.answer is not None and retry.member is not None:
            self._learn(call, app, retry.member, answer)
        self.metrics.ip_restricted_retries.labels(call.outcome or "upstream_error").inc()
        return answer

    def _learn(self, call: TokenCall, app: App | None, member: Member, answer: Answer) -> None:
        """Classify Salesforce's answer and keep what it says about the member's egress IP for the app."""
        classified = classify_response(answer.status, answer.content())
        call.outcome, call.error_code = classified.outcome, classified.error_code
        if call.outcome == "ip_restricted":
            self.evidence.record(app, member.egress_ip, "refused")
        elif call.outcome == "success" and call.grant_type in ALLOWLISTED_GRANTS:
            self.evidence.record(app, member.egress_ip, "allowed")

    def _describe_route(self, call: TokenCall, member: Member | None) -> None:
        if member is None:
            call.route, call.member, call.egress_ip = "direct", MEMBER_DIRECT, EGRESS_UNKNOWN
        else:
            call.route, call.member = "pair", member.label
            call.egress_ip = member.egress_ip or EGRESS_UNKNOWN

    def _after_send(self, call: TokenCall, result: SendResult, app: App | None) -> Answer:
        labels = [a.member.label if a.member else MEMBER_DIRECT for a in result.attempts]
        if len(labels) > 1:
            self.metrics.failovers.inc(len(labels) - 1)
        if len(labels) > 1 or call.attempts:  # failed over, or retried: the route is the last attempt's
            self._describe_route(call, result.member)
            if result.member is not None:
                call.guard = self.guard.verdict_for(result.member, call.grant_type, app)
        call.attempts += labels
        if result.answer is not None:
            return result.answer
        call.outcome, call.detail, call.local = "upstream_error", result.detail, True
        if result.sent:
            return responses.failed_after_send(_via(call), result.detail or "")
        return responses.unreachable(call.attempts, result.detail or "")

    def _refuse(self, call: TokenCall, status: int, error: str, description: str) -> Answer:
        """Refuse a malformed token call without sending it anywhere."""
        _mark_refused(call, description)
        return responses.local_answer(status, error, description)

    def other_member(self, on_token_host: bool) -> Member | None:
        """The route of anything that is not a token call: direct unless SIDECAR_ROUTE says otherwise."""
        if self.pair.direct:
            return None
        if self.route_mode == "all" or (self.route_mode == "salesforce" and on_token_host):
            return self.guard.choose("other").member
        return None

    # -- classify and record ------------------------------------------------------------------
    def finish(self, call: TokenCall, req: TokenRequest | None, answer: Answer) -> None:
        """Classify the answer the app got and record the call, just after the answer went out."""
        if not call.local and call.outcome is None:  # (the core classified what it sent itself)
            classified = classify_response(answer.status, answer.content())
            call.outcome, call.error_code = classified.outcome, classified.error_code
        call.status = answer.status
        call.duration = max(0.0, answer.finished - call.started)
        self._finish_soon(call, req, answer)

    def abandoned(self, call: TokenCall, req: TokenRequest | None, detail: str, now: float) -> None:
        """Record a token call whose client left (or stalled) before its whole request arrived: nothing
        was sent anywhere, so it is the client's error, not the upstream's."""
        _mark_refused(call, detail[:300])
        call.duration = max(0.0, now - call.started)
        self._finish_soon(call, req, None)

    def _finish_soon(self, call: TokenCall, req: TokenRequest | None, answer: Answer | None) -> None:
        """Record right after the answer has been passed on: the app does not wait for the log line,
        the metrics and refresh token tracking (a few tenths of a millisecond per call)."""
        asyncio.get_running_loop().call_soon(self._finish, call, req, answer)

    def _finish(self, call: TokenCall, req: TokenRequest | None, answer: Answer | None) -> None:
        try:
            self.recorder.record(call)
            for observer in self.observers:
                observer(call, req, answer)
        except Exception as exc:  # noqa: BLE001 - recording must never break the proxy
            event(log, logging.ERROR, f"recording a token call failed ({type(exc).__name__})")


def _mark_refused(call: TokenCall, detail: str) -> None:
    """A token call that was not sent anywhere because of the client (a refusal, or it left)."""
    call.route, call.member, call.egress_ip = "refused", MEMBER_NONE, EGRESS_NONE
    call.outcome, call.detail, call.local = "client_error", detail, True


def _via(call: TokenCall) -> str:
    return f"via pair member {call.member}" if call.route == "pair" else "direct"
