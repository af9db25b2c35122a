"""The allowlist guard: which pair member a token call may leave through.

``observe`` routes as QuotaGuard's own balancer would (round-robin over the members that are up) and
only reports calls that leave from an IP that is not allowlisted. ``enforce`` sends a call that may be
subject to the Refresh Token IP Allowlist (every grant but the ones known to be exempt) only through
members whose *verified* egress IP is on the allowlist, and refuses the call (nothing is sent to
Salesforce) when there is none.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

from sidecar.allowlist import Allowlist
from sidecar.pair import Member, Pair
from sidecar.tokencall import subject_to_allowlist

Verdict = Literal["allow", "unverified", "not_allowlisted", "blocked", "direct"]


@dataclass(frozen=True)
class Decision:
    """Where one token call goes: through ``member``, direct (no member), or nowhere (blocked)."""

    member: Member | None
    verdict: Verdict
    reason: str | None = None

    @property
    def blocked(self) -> bool:
        return self.verdict == "blocked"


class Guard:
    def __init__(self, pair: Pair, allowlist: Allowlist, mode: Literal["observe", "enforce"]) -> None:
        self.pair = pair
        self.allowlist = allowlist
        self.mode = mode
        self._turn = itertools.count()

    def is_allowlisted(self, ip: str | None) -> bool | None:
        """True/False for a known IP against a configured allowlist; None when either is unknown."""
        if ip is None or not self.allowlist:
            return None
        return self.allowlist.contains(ip)

    def eligible(self, grant_type: str, now: float | None = None) -> list[Member]:
        members = [m for m in self.pair.members if m.available(now)]
        if self.mode == "enforce" and subject_to_allowlist(grant_type):
            return [m for m in members if self.is_allowlisted(m.egress_ip)]
        return members or list(self.pair.members)  # all down: try anyway rather than fail closed

    def choose(self, grant_type: str, *, exclude: tuple[Member, ...] = (), now: float | None = None) -> Decision:
        if self.pair.direct:
            return Decision(None, "direct")
        candidates = [m for m in self.eligible(grant_type, now) if m not in exclude]
        if not candidates:
            return Decision(None, "blocked", self.explain_block())
        member = candidates[next(self._turn) % len(candidates)]
        return Decision(member, self.verdict_for(member, grant_type))

    def verdict_for(self, member: Member, grant_type: str) -> Verdict:
        if not self.allowlist or not subject_to_allowlist(grant_type):
            return "allow"
        state = self.is_allowlisted(member.egress_ip)
        if state is None:
            return "unverified"
        return "allow" if state else "not_allowlisted"

    def missing_ips(self) -> list[str]:
        """Observed egress IPs that are not on the allowlist."""
        return [ip for ip in self.pair.egress_ips() if not self.allowlist.contains(ip)] if self.allowlist else []

    def explain_block(self) -> str:
        missing = self.missing_ips()
        down = [m.label for m in self.pair.members if not m.available()]
        parts = []
        if missing:
            parts.append(
                "egress IP(s) " + ", ".join(missing) + " are not on the Refresh Token IP Allowlist; add them "
                "in External Client App Manager (Edit Settings) or to SIDECAR_ALLOWLIST if already added"
            )
        unverified = [m.label for m in self.pair.members if m.egress_ip is None]
        if unverified:
            parts.append(
                "the egress IP of member(s) " + ", ".join(unverified) + " is not verified yet "
                "(probe pending, failing or unstable; pin it with SIDECAR_EGRESS_IPS)"
            )
        if down:
            parts.append("member(s) " + ", ".join(down) + " are down")
        return "no pair member with an allowlisted egress IP is available: " + ("; ".join(parts) or "unknown")

    def ready(self) -> bool:
        """Enforce mode is only ready while some member that answers its probes has an allowlisted
        egress IP. Passive ejection (a few failed connects) is left out on purpose: it heals in seconds
        and must not flap the pod's readiness."""
        if self.mode != "enforce" or self.pair.direct:
            return True
        return any(m.up is not False and self.is_allowlisted(m.egress_ip) for m in self.pair.members)
