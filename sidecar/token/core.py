"""The token core: one token call's journey, detect → refuse → (addons: route, shield) → send → classify
→ (addons: learn, record), the same for every engine that serves token calls.

The core owns the I/O and the order of events; what to do at each point is policy, in the addons
(``addons/``: the guard, the rotation shield, the evidence, grant tracking, the record), called through
:class:`~sidecar.token.flow.Hooks` in a fixed order. The engine serving the app's connection (the lane)
turns the app's request into a :class:`~sidecar.token.messages.TokenRequest`, calls :meth:`TokenCore.refusal`
on its head and :meth:`TokenCore.answer` on the whole request, writes the answer back and calls
:meth:`TokenCore.finish`. Nothing here knows an engine's types.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Sequence

from sidecar.egress.pair import Member
from sidecar.logs import event
from sidecar.metrics import (
    EGRESS_NONE,
    EGRESS_UNKNOWN,
    EGRESS_UNVERIFIED,
    MEMBER_DIRECT,
    MEMBER_NONE,
)
from sidecar.token import answers
from sidecar.token.bookkeeping import Bookkeeping
from sidecar.token.call import (
    TokenCall,
    classify_response,
    grant_of,
    host_class,
    is_token_request,
)
from sidecar.token.flow import Hooks, TokenFlow
from sidecar.token.hosts import TokenHosts
from sidecar.token.messages import Answer
from sidecar.token.sender import SendResult, TokenSender, Unsendable

log = logging.getLogger("egress_sidecar.route")
MAX_TOKEN_REQUEST_BYTES = 64 * 1024  # a token request is a few hundred bytes of form fields
# Beyond this declared size the connection is closed at once instead of reading the body to answer 413.
MAX_TOKEN_REQUEST_READ = 1024 * 1024


class Close:
    """Close the client connection without an answer (see TokenCore.refusal)."""


CLOSE = Close()


class TokenCore:
    def __init__(self, hosts: TokenHosts, sender: TokenSender, addons: Sequence[object]) -> None:
        self.hosts = hosts
        self.sender = sender
        self.hooks = Hooks(addons)
        self.books = Bookkeeping(self.hooks)  # the done hooks, batched after the answers (flush() at shutdown)
        self.in_flight = 0  # token calls being routed and sent right now (shutdown waits for them)

    # -- detect and refuse (the head) ---------------------------------------------------------
    def detect(self, host: str, method: str, path: str, started: float) -> TokenFlow | None:
        """A new flow when this is a token call to a token host, else None. ``host`` is where the bytes
        really go (the CONNECT target or TLS SNI), not what the Host header claims."""
        if self.hosts.matches(host) and is_token_request(method, path):
            return TokenFlow(TokenCall(started=started, host_class=host_class(host), grant_type="other"))
        return None

    def refusal(self, flow: TokenFlow, scheme: str, declared: int | None) -> Answer | Close | None:
        """Look at a token call's head before its body is read: a local answer for a call that must not
        be sent (the connection is closed after it: the body is left unread), CLOSE for one whose
        declared body is too large even to read, None for one to go on with. ``declared``: the
        Content-Length (None for a chunked body: the reader stops at MAX_TOKEN_REQUEST_BYTES)."""
        if scheme != "https":
            return _refuse(flow, 400, "token_call_not_https", "token calls must use https://; this one was not sent anywhere")
        if declared is not None and declared > MAX_TOKEN_REQUEST_READ:
            event(log, logging.WARNING, f"closed a client sending a {declared}-byte token request",
                  limit=MAX_TOKEN_REQUEST_BYTES)
            return CLOSE
        if declared is not None and declared > MAX_TOKEN_REQUEST_BYTES:
            return self.too_large(flow, declared)
        return None

    def too_large(self, flow: TokenFlow, size: int | None = None) -> Answer:
        """The answer for a token request body over the cap (declared, or found while reading a chunked one)."""
        what = f"of {size} bytes" if size is not None else "(chunked)"
        return _refuse(flow, 413, "token_request_too_large",
                       f"token request body {what} exceeds {MAX_TOKEN_REQUEST_BYTES} bytes")

    # -- route and send -----------------------------------------------------------------------
    async def answer(self, flow: TokenFlow) -> Answer:
        """Route and send one token call (``flow.request`` whole); always returns the answer for the app."""
        call = flow.call
        call.in_flight = True
        self.in_flight += 1
        try:
            await self._route_and_send(flow)
        except asyncio.CancelledError:
            self.hooks.error(flow)
            raise
        except Exception as exc:  # noqa: BLE001 - never let a token call go out any other way
            event(log, logging.ERROR, f"token call failed inside the sidecar ({type(exc).__name__}: {exc})"[:300])
            log.debug("token call failed: %s", traceback.format_exc())
            call.outcome, call.local = "upstream_error", True
            flow.answer = answers.failed_after_send(_via(call), "an internal error in the sidecar")
        finally:
            call.in_flight = False
            self.in_flight -= 1
        await self.hooks.response(flow)
        assert flow.answer is not None
        return flow.answer

    async def _route_and_send(self, flow: TokenFlow) -> None:
        req, call = flow.request, flow.call
        assert req is not None
        if len(req.body) > MAX_TOKEN_REQUEST_BYTES:
            flow.answer = self.too_large(flow, len(req.body))
            return
        flow.fields = req.fields()
        call.grant_type = grant_of(flow.fields)
        await self.hooks.request(flow)  # route, or answer without sending (blocked, coalesced, replayed)
        if flow.answer is not None:
            return
        _describe_route(call, flow.member, flow.member.egress_ip if flow.member else None)
        try:
            result = await self._send(flow, flow.member, lambda tried: self.hooks.failover(flow, tried))
            if result.egress_refused:
                return
            if result.answer is None or result.member is None:
                return
            refused = result.member
            retry = self.hooks.retry(flow, refused, [])
            if retry is not None:
                await self._retry(flow, refused, retry, result.conn_id)
        except Unsendable as exc:
            flow.answer = _refuse(flow, 400, "token_request_malformed",
                                  f"the token request cannot be sent as HTTP/1.1 ({exc}); it was not sent anywhere")

    async def _send(self, flow: TokenFlow, member: Member | None, next_member: object,
                    avoid: int | None = None) -> SendResult:
        """One send (failing over while nothing has left); Salesforce's answer is classified and shown to
        the addons, or the sidecar's own answer says what failed."""
        req, call = flow.request, flow.call
        assert req is not None
        accept = (lambda m, ip: self.hooks.accept(flow, m, ip)) if self.hooks.accepts else None
        result = await self.sender.send(req, member, next_member, accept, avoid)  # type: ignore[arg-type]
        labels = [a.member.label if a.member else MEMBER_DIRECT for a in result.attempts]
        call.failovers += len(labels) - 1
        flow.egress_verified = result.egress_ip is not None
        flow.egress_ip = result.egress_ip or (result.member.egress_ip if result.member else None)
        _describe_route(call, result.member, flow.egress_ip)
        call.egress = "verified" if flow.egress_verified else "probed" if flow.egress_ip else \
            "unverified" if result.member is not None else None
        call.attempts += labels
        if result.egress_refused:
            call.route, call.member, call.egress_ip = "blocked", MEMBER_NONE, EGRESS_NONE
            call.outcome, call.detail, call.local, call.guard = "blocked", result.detail, True, "blocked"
            flow.answer = answers.egress_refused(result.detail or "")
            return result
        if result.answer is None:
            call.outcome, call.detail, call.local = "upstream_error", result.detail, True
            flow.answer = answers.failed_after_send(_via(call), result.detail or "") if result.sent \
                else answers.unreachable(call.attempts, result.detail or "")
            return result
        flow.answer = result.answer
        classified = classify_response(result.answer.status, result.answer.content())
        call.outcome, call.error_code = classified.outcome, classified.error_code
        if result.member is not None:
            self.hooks.upstream_answer(flow, result.member)
        return result

    async def _retry(self, flow: TokenFlow, refused: Member, member: Member, avoid: int | None) -> None:
        """Send the same call once more through ``member`` (an addon asked for it after Salesforce's answer
        through ``refused``: an "ip restricted" refusal, where nothing was redeemed). When the retry
        never reaches Salesforce, the first answer stands."""
        call = flow.call
        first = (flow.answer, call.route, call.member, call.egress_ip, call.guard, call.outcome, call.error_code,
                 flow.egress_ip, flow.egress_verified, call.egress)
        call.retried_from = (call.member, call.egress_ip)
        # never on the connection Salesforce refused (its egress IP may be unverified: a new one may differ)
        retry = await self._send(flow, member, lambda tried: self.hooks.retry(flow, refused, tried), avoid)
        if retry.answer is None and not retry.sent:
            (flow.answer, call.route, call.member, call.egress_ip, call.guard, call.outcome, call.error_code,
             flow.egress_ip, flow.egress_verified, call.egress) = first
            call.retried_from, call.local = None, False
            call.retry_outcome = "upstream_error"
            call.detail = f"a retry through another egress IP could not be sent: {retry.detail}"
            return
        call.retry_outcome = call.outcome or "upstream_error"

    # -- classify and record ------------------------------------------------------------------
    def finish(self, flow: TokenFlow, answer: Answer) -> None:
        """Classify the answer the app got and record the call, just after the answer went out."""
        call = flow.call
        flow.answer = answer
        if not call.local and call.outcome is None:  # (the core classified what it sent itself)
            classified = classify_response(answer.status, answer.content())
            call.outcome, call.error_code = classified.outcome, classified.error_code
        call.status = answer.status
        call.duration = max(0.0, answer.finished - call.started)
        self._done_soon(flow)

    def abandoned(self, flow: TokenFlow, detail: str, now: float | None = None) -> None:
        """Record a token call whose client left (or stalled) before its whole request arrived: nothing
        was sent anywhere, so it is the client's error, not the upstream's."""
        _mark_refused(flow.call, detail[:300])
        flow.call.duration = max(0.0, (time.time() if now is None else now) - flow.call.started)
        self._done_soon(flow)

    def _done_soon(self, flow: TokenFlow) -> None:
        """The ``done`` hooks run after the answer has been passed on, in a batch with the calls finishing
        about now (:mod:`sidecar.token.bookkeeping`): the app does not wait for the log line, the metrics,
        the audit trail and refresh token tracking."""
        self.books.add(flow)


def _describe_route(call: TokenCall, member: Member | None, egress_ip: str | None) -> None:
    if member is None:
        call.route, call.member, call.egress_ip = "direct", MEMBER_DIRECT, EGRESS_UNKNOWN
    else:
        call.route, call.member = "pair", member.label
        call.egress_ip = egress_ip or EGRESS_UNVERIFIED


def _refuse(flow: TokenFlow, status: int, error: str, description: str) -> Answer:
    """Refuse a malformed token call without sending it anywhere."""
    _mark_refused(flow.call, description)
    return answers.local_answer(status, error, description)


def _mark_refused(call: TokenCall, detail: str) -> None:
    """A token call that was not sent anywhere because of the client (a refusal, or it left)."""
    call.route, call.member, call.egress_ip = "refused", MEMBER_NONE, EGRESS_NONE
    call.outcome, call.detail, call.local = "client_error", detail, True


def _via(call: TokenCall) -> str:
    return f"via pair member {call.member}" if call.route == "pair" else "direct"
