"""A token call on its way through the core, and the hooks the core calls on the policy addons.

The core (:mod:`sidecar.token.core`) owns the I/O and the order of events; policy lives in ``addons/``,
in mitmproxy's addon style: each addon is a small class whose methods are named after the events they
handle, and the core calls them at fixed points of every token call, in the order the addons were
given (``sidecar.app.service`` lists them). Every hook is optional:

``request(flow)`` (may be async)
    The request is whole (``flow.request``, ``flow.fields``, ``flow.call.grant_type``). A hook may choose
    the route (``flow.member``) or answer without sending (``flow.answer``; as mitmproxy's
    ``flow.response``): the hooks after it are then skipped and nothing is sent.
``accept(flow, member, egress_ip) -> bool``
    A connection through ``member`` leaves from ``egress_ip`` (asked on that very connection; None when it
    could not be): may the call go on it? Every hook must agree; one turned down stays pooled for other
    calls and another is opened (bounded), then another member is tried.
``failover(flow, tried) -> Member | None``
    Connecting through ``flow.member`` failed before any byte of the request left: another member, or
    None to give up. The first hook that names one wins.
``upstream_answer(flow, member)``
    Salesforce answered one attempt through ``member`` from ``flow.egress_ip`` (``flow.answer``,
    ``flow.call.outcome`` classified).
``retry(flow, refused, tried) -> Member | None``
    After Salesforce's answer through ``refused``: a member to send the very same call through once more
    (the core sends at most one retry), or None. Also asked again while that retry fails over.
``response(flow)`` (may be async)
    The final answer is known and about to go to the app.
``error(flow)``
    The call ended without an answer (cancelled while the sidecar stops).
``answered(flow)``
    The app has its answer, or left: state a next call may need at once (with replicas on Redis, refresh
    token tracking learns the rotation, which another replica looks up when the app redeems the new token,
    maybe milliseconds later). Runs right after the answer was written, each call on its own.
``done(flow)``
    The app has its answer, or left: bookkeeping (the record, the audit trail). Runs after the answer was
    written, never before it, in batches (:mod:`sidecar.token.bookkeeping`).

Hooks are plain method calls looked up once, when the core is built: nothing dynamic on the hot path.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sidecar.egress.pair import Member
from sidecar.logs import event
from sidecar.token.call import TokenCall
from sidecar.token.messages import Answer, TokenRequest

log = logging.getLogger("egress_sidecar.addons")


@dataclass(slots=True, eq=False)
class TokenFlow:
    """One token call: the record it becomes (``call``), what the app sent (``request``, its ``fields``
    parsed once), what the addons decided (``app``, ``org``, ``member``) and what the app gets (``answer``)."""

    call: TokenCall
    request: TokenRequest | None = None
    fields: dict[str, list[str]] = field(default_factory=dict)
    app: Any = None  # sidecar.egress.evidence.App: the app Salesforce sees (its client_id, as a keyed hash)
    # sidecar.egress.evidence.Org: the customer org the call is for, from the grant it redeems (``org.id`` the
    # raw org id, ``org.user`` the user, once an answer named them; until then the grant's own key), or None
    org: Any = None
    member: Member | None = None  # the route: None is direct
    egress_ip: str | None = None  # the IP the last attempt left from (verified on its connection, or probed)
    egress_verified: bool = False  # whether egress_ip was asked on that very connection
    answer: Answer | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # an addon's own state for this call

    @property
    def authorization(self) -> str | None:
        """The request's Authorization header (HTTP Basic client credentials), if any."""
        if self.request is None:
            return None
        value = self.request.header(b"authorization")
        return value.decode("latin-1") if value is not None else None


Hook = Callable[..., Any]


def _hooks(addons: Sequence[object], name: str) -> tuple[tuple[Hook, bool], ...]:
    found = []
    for addon in addons:
        hook = getattr(addon, name, None)
        if hook is not None:
            found.append((hook, inspect.iscoroutinefunction(hook)))
    return tuple(found)


class Hooks:
    """The addons' hooks, in the addons' order, one tuple per event."""

    def __init__(self, addons: Sequence[object]) -> None:
        self.addons = tuple(addons)
        self._request = _hooks(addons, "request")
        self._accept = tuple(h for h, _ in _hooks(addons, "accept"))
        self._failover = tuple(h for h, _ in _hooks(addons, "failover"))
        self._upstream_answer = tuple(h for h, _ in _hooks(addons, "upstream_answer"))
        self._retry = tuple(h for h, _ in _hooks(addons, "retry"))
        self._response = _hooks(addons, "response")
        self._error = tuple(h for h, _ in _hooks(addons, "error"))
        self._answered = tuple(h for h, _ in _hooks(addons, "answered"))
        self._done = tuple(h for h, _ in _hooks(addons, "done"))

    async def request(self, flow: TokenFlow) -> None:
        for hook, is_async in self._request:
            if is_async:
                await hook(flow)
            else:
                hook(flow)
            if flow.answer is not None:
                return

    @property
    def accepts(self) -> bool:
        """Whether any addon judges connections (else none is asked about, and any is taken)."""
        return bool(self._accept)

    def accept(self, flow: TokenFlow, member: Member, egress_ip: str | None) -> bool:
        return all(hook(flow, member, egress_ip) for hook in self._accept)

    def failover(self, flow: TokenFlow, tried: list[Member]) -> Member | None:
        return _first(self._failover, flow, tried)

    def upstream_answer(self, flow: TokenFlow, member: Member) -> None:
        for hook in self._upstream_answer:
            hook(flow, member)

    def retry(self, flow: TokenFlow, refused: Member, tried: list[Member]) -> Member | None:
        return _first(self._retry, flow, refused, tried)

    async def response(self, flow: TokenFlow) -> None:
        for hook, is_async in self._response:
            await _quietly(hook, is_async, flow)

    def error(self, flow: TokenFlow) -> None:
        for hook in self._error:
            _quiet_call(hook, flow)

    def answered(self, flow: TokenFlow) -> None:
        for hook in self._answered:
            _quiet_call(hook, flow)

    def done(self, flow: TokenFlow) -> None:
        for hook in self._done:
            _quiet_call(hook, flow)


def _first(hooks: tuple[Hook, ...], *args: Any) -> Member | None:
    for hook in hooks:
        member = hook(*args)
        if member is not None:
            return member
    return None


def _quiet_call(hook: Hook, flow: TokenFlow) -> None:
    """Bookkeeping must never break the proxy: a failing hook is logged and the next one runs."""
    try:
        hook(flow)
    except Exception as exc:  # noqa: BLE001
        _failed(hook, exc)


async def _quietly(hook: Hook, is_async: bool, flow: TokenFlow) -> None:
    try:
        result = hook(flow)
        if is_async:
            await result
    except Exception as exc:  # noqa: BLE001
        _failed(hook, exc)


def _failed(hook: Hook, exc: BaseException) -> None:
    owner = type(getattr(hook, "__self__", hook)).__name__
    event(log, logging.ERROR, f"addon {owner}.{getattr(hook, '__name__', '?')} failed ({type(exc).__name__}); "
          "the token call was not affected", addon=owner)

