"""The allowlist guard: which pair member a token call may leave through, or none.

It routes each token call round-robin over the members the guard allows (``observe``: every member
that is up, as QuotaGuard's own balancer would; ``enforce``: only those whose egress IP may redeem for
the call's app and customer org, except one redemption per ``SIDECAR_EVIDENCE_TTL`` that re-tests a
refused IP), blocks it when none may (503, nothing sent), picks another member while a connect fails
before any byte left, and, with ``SIDECAR_RETRY_IP_RESTRICTED``, sends a redemption Salesforce refused as
"ip restricted" once more through a different egress IP: nothing was redeemed, so it is safe. The rules
are :class:`sidecar.egress.guard.Guard`.
"""

from __future__ import annotations

from sidecar.egress.guard import Guard as Rules
from sidecar.egress.pair import Member
from sidecar.metrics import EGRESS_NONE, MEMBER_NONE
from sidecar.token import answers
from sidecar.token.call import subject_to_allowlist
from sidecar.token.flow import TokenFlow


class Guard:
    def __init__(self, rules: Rules, *, retry_ip_restricted: bool) -> None:
        self.rules = rules
        self.retry_ip_restricted = retry_ip_restricted

    def request(self, flow: TokenFlow) -> None:
        call = flow.call
        decision = self.rules.choose(call.grant_type, app=flow.app, org=flow.org)
        call.guard = decision.verdict
        if decision.blocked:
            call.route, call.member, call.egress_ip = "blocked", MEMBER_NONE, EGRESS_NONE
            call.outcome, call.detail, call.local = "blocked", decision.reason, True
            flow.answer = answers.blocked(self.rules, decision.reason or "")
        else:
            flow.member = decision.member

    def accept(self, flow: TokenFlow, member: Member, egress_ip: str | None) -> bool:
        """A connection's own egress IP (asked on it): never one Salesforce just refused for this call, and
        in enforce mode only one the app may redeem from."""
        if egress_ip is not None and egress_ip == flow.metadata.get("refused_ip"):
            return False
        if not self.rules.accepts(flow.call.grant_type, egress_ip, flow.app, flow.org):
            if not (flow.call.guard == "retest" and egress_ip == member.egress_ip):  # (a re-test goes on purpose)
                return False
        elif flow.call.guard != "retest":
            flow.call.guard = self.rules.verdict_for(member, flow.call.grant_type, flow.app, flow.org, egress_ip)
        return True

    def failover(self, flow: TokenFlow, tried: list[Member]) -> Member | None:
        member = self.rules.choose(flow.call.grant_type, app=flow.app, org=flow.org, exclude=tuple(tried)).member
        return self._verdict(flow, member)

    def retry(self, flow: TokenFlow, refused: Member, tried: list[Member]) -> Member | None:
        if not (self.retry_ip_restricted and flow.call.outcome == "ip_restricted"
                and subject_to_allowlist(flow.call.grant_type)):
            return None
        refused_ip = flow.metadata.setdefault("refused_ip", flow.egress_ip)
        member = self.rules.retry_member(flow.app, refused, org=flow.org, exclude=tuple(tried), refused_ip=refused_ip)
        if flow.call.guard == "retest":  # the record says this call re-tested a refused IP (retried_from names it)
            return member
        return self._verdict(flow, member)

    def _verdict(self, flow: TokenFlow, member: Member | None) -> Member | None:
        if member is not None:  # the call leaves through another member now: its verdict is that member's
            flow.call.guard = self.rules.verdict_for(member, flow.call.grant_type, flow.app, flow.org)
        return member
