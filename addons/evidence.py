"""Evidence: learn from Salesforce's answers which egress IPs may redeem for which app.

A typed allowlist is a hint; what Salesforce answered through an egress IP is the truth. This addon
names the app each token call is for (the ``client_id`` Salesforce reads, kept as a keyed hash) and,
after every answer Salesforce gives through a pair member, keeps what it says about that member's
egress IP: an "ip restricted" refusal, or a successful redemption of a grant the allowlist applies to.
The guard reads it back (:mod:`addons.guard`). The facts, their lifetime and their store are
:mod:`sidecar.egress.evidence`.
"""

from __future__ import annotations

from sidecar.egress.evidence import Evidence as Facts
from sidecar.egress.pair import Member
from sidecar.token.call import ALLOWLISTED_GRANTS, client_id
from sidecar.token.flow import TokenFlow


class Evidence:
    def __init__(self, facts: Facts) -> None:
        self.facts = facts

    def request(self, flow: TokenFlow) -> None:
        """Which app this call is for (first: the guard and the audit read it)."""
        flow.app = self.facts.app(client_id(flow.fields, flow.authorization))
        flow.call.app = flow.app.label if flow.app else None

    def upstream_answer(self, flow: TokenFlow, member: Member) -> None:
        """What Salesforce said about the IP the call left from (verified on its connection, or probed)."""
        outcome = flow.call.outcome
        if outcome == "ip_restricted":
            self.facts.record(flow.app, flow.egress_ip, "refused")
        elif outcome == "success" and flow.call.grant_type in ALLOWLISTED_GRANTS:
            self.facts.record(flow.app, flow.egress_ip, "allowed")
