"""The allowlist guard: which pair member a token call may leave through.

``observe`` routes as QuotaGuard's own balancer would (round-robin over the members that are up) and
only reports calls that leave from an IP that is not allowlisted. ``enforce`` sends a call that may be
subject to the Refresh Token IP Allowlist (every grant but the ones known to be exempt) only through
members whose egress IP may redeem for that app and customer org, and refuses the call (nothing is sent
to Salesforce) when there is none. What Salesforce answered through an IP (:mod:`sidecar.egress.evidence`)
decides first: an IP refused for the call's org, or for the whole app, is avoided, except for one
redemption per ``SIDECAR_EVIDENCE_TTL`` that re-tests it (with the retry behind it). ``SIDECAR_ALLOWLIST``
is the hint where there is no answer yet: a listed, verified IP may, an unlisted one may not. With no
allowlist configured and no answer yet, an IP may (Salesforce's first answer teaches the guard, and a
refused redemption is safe to send again elsewhere).

Every judgement is made per egress IP (:meth:`Guard.standing_ip`, :meth:`Guard.may_redeem`), so a
connection whose egress IP is known only once it is open can be judged the same way; the member-based
calls are thin wrappers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

from sidecar.egress.allowlist import Allowlist
from sidecar.egress.evidence import App, Evidence, Org
from sidecar.egress.pair import Member, Pair
from sidecar.token.call import subject_to_allowlist

Verdict = Literal["allow", "unverified", "not_allowlisted", "blocked", "direct", "retest"]
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

    # -- per egress IP ----------------------------------------------------------------------------
    def standing_ip(self, ip: str | None, app: App | None = None, org: Org | None = None) -> Standing:
        """May a redemption for ``app`` and ``org`` leave from egress IP ``ip`` (None: not verified)?
        Salesforce's answers first ("refused" for this org or for the app, "allowed" where some org redeemed
        through it), then SIDECAR_ALLOWLIST ("allowed" for a listed verified IP, "unlisted" otherwise), else
        "unknown"."""
        said = self.evidence.said(app, org, ip) if self.evidence is not None else None
        if said is not None:
            return said.kind
        if self.allowlist:
            return "allowed" if self.is_allowlisted(ip) else "unlisted"
        return "unknown"

    def accepts(self, grant_type: str, ip: str | None, app: App | None = None, org: Org | None = None) -> bool:
        """May the call leave through a connection whose egress IP, asked on it, is ``ip`` (None: it could
        not be asked: the call goes, as it would without the sidecar, with the safe retry behind it)?"""
        return ip is None or self.may_redeem(ip, grant_type, app, org)

    def may_redeem(self, ip: str | None, grant_type: str, app: App | None = None, org: Org | None = None) -> bool:
        """May this call leave from ``ip``? Always in observe mode and for grants the allowlist does not
        apply to; in enforce mode only where it is not known to be refused (nor left out of the typed list)."""
        if self.mode != "enforce" or not subject_to_allowlist(grant_type):
            return True
        return self.standing_ip(ip, app, org) in ("allowed", "unknown")

    def retest_due(self, ip: str | None, grant_type: str, app: App | None = None, org: Org | None = None) -> bool:
        """Is ``ip`` refused for this call's org or app with its re-test due (enforce mode)?"""
        if self.mode != "enforce" or not subject_to_allowlist(grant_type) or self.evidence is None or not ip:
            return False
        said = self.evidence.said(app, org, ip)
        return said is not None and said.kind == "refused" and said.due

    def verdict_ip(self, ip: str | None, grant_type: str, app: App | None = None, org: Org | None = None) -> Verdict:
        if not subject_to_allowlist(grant_type):
            return "allow"
        said = self.evidence.said(app, org, ip) if self.evidence is not None else None
        if said is not None:
            return "allow" if said.kind == "allowed" else "not_allowlisted"
        if not self.allowlist:
            return "allow"
        state = self.is_allowlisted(ip)
        if state is None:
            return "unverified"
        return "allow" if state else "not_allowlisted"

    # -- per member: thin wrappers ----------------------------------------------------------------
    def standing(self, member: Member, app: App | None = None, org: Org | None = None) -> Standing:
        """By the member's one probed egress IP; a member whose connections show several IPs, each verified
        on its connection, is "unknown" here (each connection is judged on its own: :meth:`accepts`)."""
        if member.egress_ip is None and member.verifies:
            return "unknown"
        return self.standing_ip(member.egress_ip, app, org)

    def verdict_for(self, member: Member, grant_type: str, app: App | None = None, org: Org | None = None,
                    ip: str | None = None) -> Verdict:
        """The verdict on a call leaving through ``member`` (from ``ip`` when its connection's IP is known)."""
        return self.verdict_ip(ip or member.egress_ip, grant_type, app, org)

    def eligible(self, grant_type: str, now: float | None = None, app: App | None = None,
                 org: Org | None = None) -> list[Member]:
        members = [m for m in self.pair.members if m.available(now)]
        if self.mode == "enforce" and subject_to_allowlist(grant_type):
            good = [m for m in members if self.standing(m, app, org) in ("allowed", "unknown")]
            # Never worse than the plain recipe: a member whose connections' egress cannot be told (no single
            # probed IP, connections unverified) still carries the call when no better one may, unless every
            # IP it has shown is one the call may not use; a refusal is then retried (retry_member).
            return good or [m for m in members if m.egress_ip is None and not m.verifies and not (
                m.observed_ips and all(not self.may_redeem(ip, grant_type, app, org) for ip in m.observed_ips))]
        return members or list(self.pair.members)  # all down: try anyway rather than fail closed

    def choose(self, grant_type: str, *, app: App | None = None, org: Org | None = None,
               exclude: tuple[Member, ...] = (), now: float | None = None) -> Decision:
        if self.pair.direct:
            return Decision(None, "direct")
        retest = self._retest(grant_type, app, org, exclude, now)
        if retest is not None:
            return Decision(retest, "retest")
        candidates = [m for m in self.eligible(grant_type, now, app, org) if m not in exclude]
        if not candidates:
            return Decision(None, "blocked", self.explain_block(app, org))
        member = candidates[next(self._turn) % len(candidates)]
        return Decision(member, self.verdict_for(member, grant_type, app, org))

    def _retest(self, grant_type: str, app: App | None, org: Org | None, exclude: tuple[Member, ...],
                now: float | None) -> Member | None:
        """A member whose refused egress IP is due for its re-test, claimed for this call (the next re-test
        is then a TTL away), or None."""
        if self.evidence is None:
            return None
        for m in self.pair.members:
            if m not in exclude and m.available(now) and self.retest_due(m.egress_ip, grant_type, app, org) \
                    and m.egress_ip is not None and self.evidence.claim(app, org, m.egress_ip):
                return m
        return None

    def retry_member(self, app: App | None, refused: Member, *, org: Org | None = None,
                     exclude: tuple[Member, ...] = (), now: float | None = None,
                     refused_ip: str | None = None) -> Member | None:
        """For a redemption Salesforce refused as "ip restricted" through ``refused`` (from ``refused_ip``): a
        member that can leave from a different IP not known to be refused for the org or the app: one whose
        probed IP is known and different, or one (the refused one included) whose connections are verified
        one by one, so the retry can take a connection from another IP, or, when they cannot be verified, one
        that has shown more than one IP (a new connection may leave from another). The typed allowlist is
        only a preference here: Salesforce just said it is wrong about at least one IP."""
        refused_ip = refused_ip or refused.egress_ip
        order = {"allowed": 0, "unknown": 1, "unlisted": 2}
        candidates = [(m, st) for m in self.pair.members
                      if m not in exclude and m.available(now) and (st := self.standing(m, app, org)) != "refused"
                      and ((m.egress_ip is not None and m.egress_ip != refused_ip)
                           or (m.egress_ip is None and m.verifies and refused_ip is not None)
                           or (m.egress_ip is None and not m.verifies and len(m.observed_ips) != 1))]
        if not candidates:
            return None
        best = min(order[st] for _, st in candidates)
        ranked = [m for m, st in candidates if order[st] == best]
        return ranked[next(self._turn) % len(ranked)]

    def missing_ips(self) -> list[str]:
        """Observed egress IPs that are not on the allowlist."""
        return [ip for ip in self.pair.egress_ips() if not self.allowlist.contains(ip)] if self.allowlist else []

    def explain_block(self, app: App | None = None, org: Org | None = None) -> str:
        missing = self.missing_ips()
        said = {m.egress_ip: self.evidence.said(app, org, m.egress_ip) for m in self.pair.members
                if m.egress_ip and self.evidence is not None}
        for_app = [ip for ip, s in said.items() if s is not None and s.kind == "refused" and s.scope != "org"]
        for_org = [ip for ip, s in said.items() if s is not None and s.kind == "refused" and s.scope == "org"]
        down = [m.label for m in self.pair.members if not m.available()]
        parts = []
        if for_app:
            parts.append(
                "Salesforce refused egress IP(s) " + ", ".join(for_app) + " for this app (ip restricted): add them "
                "to the External Client App's Refresh Token IP Allowlist"
            )
        if for_org:
            parts.append(
                "Salesforce refused egress IP(s) " + ", ".join(for_org) + f" for this call's {org.label if org else 'org'}"
                " only (its own IP restrictions, while other orgs redeem through them): the customer must allow them"
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
