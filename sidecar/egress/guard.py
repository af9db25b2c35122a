"""The allowlist guard: which pair member a token call may leave through.

``observe`` routes as QuotaGuard's own balancer would (round-robin over the members that are up) and
only reports calls that leave from an IP that is not allowlisted. ``enforce`` sends a call that may be
subject to the Refresh Token IP Allowlist (every grant but the ones known to be exempt) only through
members whose egress IP may redeem for that app, and refuses the call (nothing is sent to Salesforce)
when there is none. What Salesforce answered through an IP for the app (:mod:`sidecar.egress.evidence`) decides
first; ``SIDECAR_ALLOWLIST`` is the hint where there is no answer yet: a listed, verified IP may, an
unlisted one may not. With no allowlist configured and no answer yet, an IP may (Salesforce's first
answer teaches the guard, and a refused redemption is safe to send again elsewhere).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

from sidecar.egress.allowlist import Allowlist
from sidecar.egress.evidence import App, Evidence
from sidecar.egress.pair import Member, Pair
from sidecar.token.call import subject_to_allowlist

Verdict = Literal["allow", "unverified", "not_allowlisted", "blocked", "direct"]
Standing = Literal["allowed", "unknown", "refused", "unlisted"]


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
    def __init__(self, pair: Pair, allowlist: Allowlist, mode: Literal["observe", "enforce"],
                 evidence: Evidence | None = None) -> None:
        self.pair = pair
        self.allowlist = allowlist
        self.mode = mode
        self.evidence = evidence
        self._turn = itertools.count()

    def is_allowlisted(self, ip: str | None) -> bool | None:
        """True/False for a known IP against a configured allowlist; None when either is unknown."""
        if ip is None or not self.allowlist:
            return None
        return self.allowlist.contains(ip)

    def standing(self, member: Member, app: App | None = None) -> Standing:
        """May a redemption for ``app`` leave through this member? By its one probed egress IP
        (:meth:`standing_ip`); a member whose connections show several IPs, each verified on its connection,
        is "unknown" here (each connection is judged on its own: :meth:`accepts`)."""
        if member.egress_ip is None and member.verifies:
            return "unknown"
        return self.standing_ip(member.egress_ip, app)

    def standing_ip(self, ip: str | None, app: App | None = None) -> Standing:
        """May a redemption for ``app`` leave from ``ip``? Salesforce's answers first ("allowed", "refused"),
        then SIDECAR_ALLOWLIST ("allowed" for a listed IP, "unlisted" otherwise), else "unknown"."""
        said = self.evidence.state(app, ip) if self.evidence is not None else None
        if said is not None:
            return said
        if self.allowlist:
            return "allowed" if self.is_allowlisted(ip) else "unlisted"
        return "unknown"

    def accepts(self, grant_type: str, ip: str | None, app: App | None = None) -> bool:
        """May the call leave through a connection whose egress IP, asked on it, is ``ip`` (None: it could
        not be asked: the call goes, as it would without the sidecar, with the safe retry behind it)?"""
        if self.mode != "enforce" or not subject_to_allowlist(grant_type) or ip is None:
            return True
        return self.standing_ip(ip, app) in ("allowed", "unknown")

    def eligible(self, grant_type: str, now: float | None = None, app: App | None = None) -> list[Member]:
        members = [m for m in self.pair.members if m.available(now)]
        if self.mode == "enforce" and subject_to_allowlist(grant_type):
            good = [m for m in members if self.standing(m, app) in ("allowed", "unknown")]
            # Never worse than the plain recipe: a member whose connections' egress cannot be told (no single
            # probed IP, connections unverified) still carries the call when no better one may, unless every
            # IP it has shown is one the app may not use; a refusal is then retried (retry_member).
            return good or [m for m in members if m.egress_ip is None and not m.verifies and not (
                m.observed_ips and all(self.standing_ip(ip, app) in ("refused", "unlisted") for ip in m.observed_ips))]
        return members or list(self.pair.members)  # all down: try anyway rather than fail closed

    def choose(self, grant_type: str, *, app: App | None = None, exclude: tuple[Member, ...] = (),
               now: float | None = None) -> Decision:
        if self.pair.direct:
            return Decision(None, "direct")
        candidates = [m for m in self.eligible(grant_type, now, app) if m not in exclude]
        if not candidates:
            return Decision(None, "blocked", self.explain_block(app))
        member = candidates[next(self._turn) % len(candidates)]
        return Decision(member, self.verdict_for(member, grant_type, app))

    def retry_member(self, app: App | None, refused: Member, *, exclude: tuple[Member, ...] = (),
                     now: float | None = None, refused_ip: str | None = None) -> Member | None:
        """For a redemption Salesforce refused as "ip restricted" through ``refused`` (from ``refused_ip``): a
        member that can leave from a different IP not known to be refused for the app: one whose probed IP
        is known and different, or one (the refused one included) whose connections are verified one by
        one, so the retry can take a connection from another IP, or, when they cannot be verified, one that
        has shown more than one IP (a new connection may leave from another). The typed allowlist is only a preference
        here: Salesforce just said it is wrong about at least one IP."""
        refused_ip = refused_ip or refused.egress_ip
        order = {"allowed": 0, "unknown": 1, "unlisted": 2}
        candidates = [m for m in self.pair.members
                      if m not in exclude and m.available(now) and self.standing(m, app) != "refused"
                      and ((m.egress_ip is not None and m.egress_ip != refused_ip)
                           or (m.egress_ip is None and m.verifies and refused_ip is not None)
                           or (m.egress_ip is None and not m.verifies and len(m.observed_ips) != 1))]
        if not candidates:
            return None
        best = min(order[self.standing(m, app)] for m in candidates)
        ranked = [m for m in candidates if order[self.standing(m, app)] == best]
        return ranked[next(self._turn) % len(ranked)]

    def verdict_for(self, member: Member, grant_type: str, app: App | None = None, ip: str | None = None) -> Verdict:
        """The verdict on a call leaving through ``member`` (from ``ip`` when its connection's IP is known)."""
        if not subject_to_allowlist(grant_type):
            return "allow"
        ip = ip or member.egress_ip
        said = self.evidence.state(app, ip) if self.evidence is not None else None
        if said is not None:
            return "allow" if said == "allowed" else "not_allowlisted"
        if not self.allowlist:
            return "allow"
        state = self.is_allowlisted(ip)
        if state is None:
            return "unverified"
        return "allow" if state else "not_allowlisted"

    def missing_ips(self) -> list[str]:
        """Observed egress IPs that are not on the allowlist."""
        return [ip for ip in self.pair.egress_ips() if not self.allowlist.contains(ip)] if self.allowlist else []

    def explain_block(self, app: App | None = None) -> str:
        missing = self.missing_ips()
        refused = [m.egress_ip for m in self.pair.members if m.egress_ip and self.standing(m, app) == "refused"]
        down = [m.label for m in self.pair.members if not m.available()]
        parts = []
        if refused:
            parts.append(
                "Salesforce refused egress IP(s) " + ", ".join(refused) + " for this app (ip restricted): add them "
                "to the External Client App's Refresh Token IP Allowlist"
            )
        if missing:
            parts.append(
                "egress IP(s) " + ", ".join(missing) + " are not on the Refresh Token IP Allowlist; add them "
                "in External Client App Manager (Edit Settings) or to SIDECAR_ALLOWLIST if already added"
            )
        unverified = [m.label for m in self.pair.members if m.egress_ip is None]
        if unverified and self.allowlist:
            parts.append(
                "the egress IP of member(s) " + ", ".join(unverified) + " is not verified yet "
                "(probe pending, failing or unstable; pin it with SIDECAR_EGRESS_IPS)"
            )
        if down:
            parts.append("member(s) " + ", ".join(down) + " are down")
        return "no pair member with an allowlisted egress IP is available: " + ("; ".join(parts) or "unknown")

    def ready(self) -> bool:
        """Enforce mode is only ready while some member that answers its probes may carry a refresh:
        with SIDECAR_ALLOWLIST, one whose egress IP is verified and listed; without it, any. Passive
        ejection (a few failed connects) is left out on purpose: it heals in seconds and must not flap
        the pod's readiness."""
        if self.mode != "enforce" or self.pair.direct:
            return True
        if not self.allowlist:
            return any(m.up is not False for m in self.pair.members)
        return any(m.up is not False and (self.is_allowlisted(m.egress_ip) or (
            m.egress_ip is None and m.verifies and any(self.is_allowlisted(ip) for ip in m.observed_ips)))
            for m in self.pair.members)
