"""Egress verified per connection: the egress IP of each new connection through a pair member is asked on
that very connection, before its CONNECT, so the guard judges the IP a token call really leaves from,
whatever QuotaGuard's layout (one address per static IP, or one load-balanced address: REFERENCE.md says
nothing public settles it).

The assumption behind it is checked as the sidecar runs: every probe round asks the echo twice on each
sampled connection (a TCP-level balancer keeps a connection on one node, so the two answers must agree),
and a member that closes its connection after a request, or refuses the CONNECT that follows one, cannot
be verified this way. When an assumption fails, or the echo cannot be asked (it is down, or
``SIDECAR_ECHO_URL`` is ``https://``), that member's connections are *unverified*: token calls still go
(never worse than the plain recipe), the guard falls back to what the probes saw, and the log, ``/status``,
``egress_sidecar_egress_verified`` and ``check`` say so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sidecar.egress.pair import Member, Pair
from sidecar.logs import event
from sidecar.metrics import Metrics
from sidecar.net.echo import EchoTarget

log = logging.getLogger("egress_sidecar.verify")

ECHO_BACKOFF = 30.0  # after the echo failed on a connection, new connections go unverified this long (doubling)
ECHO_BACKOFF_MAX = 600.0
CONNECT_REFUSED_OFF = 3600.0  # a member that refuses a CONNECT after a request is re-tried this long after
MAX_IPS = 8  # egress IPs remembered per member (QuotaGuard gives two)


@dataclass
class State:
    """What verification showed for one member."""

    ips: dict[str, float] = field(default_factory=dict)  # egress IP -> when a connection last showed it
    off_until: float = 0.0  # new connections go unverified until then
    reason: str | None = None  # why they are unverified (None: they are verified)
    failures: int = 0  # consecutive echo failures (the backoff doubles with each)
    verified: int = 0
    sticky: bool | None = None  # whether every probed connection kept one egress IP (None: not checked yet)


class Verifier:
    def __init__(self, pair: Pair, echo_url: str, metrics: Metrics, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.pair = pair
        self.metrics = metrics
        self.clock = clock
        target = EchoTarget.from_url(echo_url)
        self.echo = target if target.scheme == "http" else None
        self.unavailable = None if self.echo is not None else (
            "SIDECAR_ECHO_URL is https://: the egress IP of a connection can only be asked on it with an http:// echo")
        self._state: dict[str, State] = {m.label: State() for m in pair.members}
        for m in pair.members:
            m.verifies = self.echo is not None
            self.metrics.egress_verified.labels(m.label).set(1 if m.verifies else 0)
            for result in ("verified", "echo_failed", "connect_refused", "disagreed"):
                self.metrics.egress_checks.labels(m.label, result)

    def state(self, member: Member) -> State:
        return self._state.setdefault(member.label, State())

    def echo_for(self, member: Member) -> EchoTarget | None:
        """The echo to ask on a new connection through ``member``, or None: leave it unverified."""
        st = self.state(member)
        if self.echo is None or st.sticky is False or self.clock() < st.off_until:
            return None
        return self.echo

    # -- what connections and probes showed -------------------------------------------------------
    def verified(self, member: Member, ip: str) -> None:
        st = self.state(member)
        st.ips[ip] = self.clock()
        if len(st.ips) > MAX_IPS:
            del st.ips[min(st.ips, key=st.ips.__getitem__)]
        st.verified += 1
        st.failures = 0
        self.metrics.egress_checks.labels(member.label, "verified").inc()
        if st.reason is not None:
            event(log, logging.INFO, f"pair member {member.label}: the egress IP of each new connection is verified "
                  f"again ({ip})", member=member.label, egress_ip=ip)
        self._mode(member, st, None)

    def failed(self, member: Member, reason: str, detail: str) -> None:
        """A new connection could not be verified (``reason``: echo_failed, connect_refused)."""
        st = self.state(member)
        self.metrics.egress_checks.labels(member.label, reason).inc()
        now = self.clock()
        if reason == "connect_refused":
            st.off_until = now + CONNECT_REFUSED_OFF
            why = f"{detail}; new connections go unverified (re-tried in {CONNECT_REFUSED_OFF / 60:g} min)"
        else:
            st.failures += 1
            backoff = min(ECHO_BACKOFF * 2 ** (st.failures - 1), ECHO_BACKOFF_MAX)
            st.off_until = now + backoff
            why = f"{detail}; new connections go unverified for {backoff:g}s"
        self._mode(member, st, why)

    def probed(self, member: Member, per_connection: list[list[str]]) -> None:
        """A probe round's answers, two per sampled connection: do connections keep one egress IP?"""
        if not per_connection:
            return
        st = self.state(member)
        split = [ips for ips in per_connection if len(set(ips)) > 1]
        if split:
            self.metrics.egress_checks.labels(member.label, "disagreed").inc()
            st.sticky = False
            self._mode(member, st, f"two IP echoes on one connection through it disagreed ({', '.join(split[0])}): a "
                       "connection does not keep one egress IP, so none can be verified")
        else:
            st.sticky = True
            if st.reason is not None and "disagreed" in st.reason and self.clock() >= st.off_until:
                self._mode(member, st, None)
        for ips in per_connection:
            for ip in ips:
                st.ips.setdefault(ip, self.clock())

    def _mode(self, member: Member, st: State, reason: str | None) -> None:
        verifies = reason is None and self.echo is not None
        if reason is not None and reason != st.reason:
            event(log, logging.WARNING, f"pair member {member.label}: egress unverified: {reason}. Token calls still go "
                  "through it; the guard relies on what the probes saw", member=member.label)
        st.reason = reason
        member.verifies = verifies
        self.metrics.egress_verified.labels(member.label).set(1 if verifies else 0)

    # -- what people see --------------------------------------------------------------------------
    def describe(self, member: Member) -> dict[str, object]:
        st = self.state(member)
        now = self.clock()
        mode = "per_connection" if member.verifies and now >= st.off_until else "unverified"
        return {"mode": mode, "reason": st.reason or self.unavailable if mode == "unverified" else None,
                "egress_ips_seen": sorted(st.ips), "connections_verified": st.verified, "sticky": st.sticky}

    def layout(self) -> str:
        """Which QuotaGuard layout the members show: one address per egress IP, or load-balanced."""
        members = self.pair.members
        shown = {m.label: set(self.state(m).ips) | set(m.observed_ips) for m in members}
        if not members or not any(shown.values()):
            return "unknown (no egress IP seen yet)"
        several = [label for label, ips in shown.items() if len(ips) > 1]
        if several:
            return (f"load-balanced: {', '.join(several)} showed {len(set().union(*shown.values()))} egress IPs "
                    "over its connections")
        return f"one address per egress IP ({len(members)} address(es))"
