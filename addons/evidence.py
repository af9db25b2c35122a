"""Evidence: learn from Salesforce's answers which egress IPs may redeem for which app and customer org.

A typed allowlist is a hint; what Salesforce answered through an egress IP is the truth, read per
customer org: an ISV's one app carries many orgs' refreshes, and an "ip restricted" refusal may be the
app's allowlist or that org's own restriction (the text does not tell them apart). This addon names,
before the call is routed, the app (the ``client_id`` Salesforce reads, as a keyed hash) and the org
(``flow.org``: from the grant the call redeems, which the grant tracker follows across rotations; a grant
whose org no answer has named yet stands for it), and with Redis reads what the other replicas learnt
for that app. After every answer through a pair member it keeps what Salesforce said about that
member's egress IP for that org; a successful answer's ``id`` names the org (and user), and a grant
that stood for its org hands its refusals over. The guard reads it back (:mod:`addons.guard`); the
facts, their scope (one org or the whole app), their re-tests and their store are
:mod:`sidecar.egress.evidence`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from sidecar.egress.evidence import Evidence as Facts
from sidecar.egress.evidence import Org
from sidecar.egress.pair import Member
from sidecar.logs import event
from sidecar.state.grants import GrantTracker
from sidecar.token.call import ALLOWLISTED_GRANTS, client_id, single_field
from sidecar.token.flow import TokenFlow
from sidecar.token.messages import grant_of

log = logging.getLogger("egress_sidecar.evidence")
RECENT_TOKENS = 10_000  # refresh tokens just issued, with their org (the grant tracker learns them after the answer)


class Evidence:
    def __init__(self, facts: Facts, grants: GrantTracker | None = None) -> None:
        self.facts = facts
        self.grants = grants
        # The refresh token an answer just issued -> the org it named. The grant tracker learns the rotation
        # only once the app has its answer (bookkeeping never delays it), and the app may redeem the new
        # token at once: this keeps the next redemption's org known whichever runs first.
        self._issued: OrderedDict[bytes, Org] = OrderedDict()

    async def request(self, flow: TokenFlow) -> None:
        """Which app and org this call is for (first: the shield, the guard and the audit read them)."""
        flow.app = self.facts.app(client_id(flow.fields, flow.authorization))
        flow.call.app = flow.app.label if flow.app else None
        try:
            if self.facts.shared is None:
                flow.org = await self._org(flow)
                await self.facts.pull(flow.app)
            else:  # both may ask Redis: at once, one round trip's wait before routing instead of two
                flow.org, _ = await asyncio.gather(self._org(flow), self.facts.pull(flow.app))
        except Exception as exc:  # noqa: BLE001 - naming the org must never break a token call
            event(log, logging.ERROR, f"the evidence addon failed ({type(exc).__name__}); the call is routed on "
                  "what this replica knows")

    async def _org(self, flow: TokenFlow) -> Org | None:
        """The org of the grant this call redeems: the one an answer named, or the grant itself (its key in
        the grant tracker; a token never seen stands for the grant it starts, an authorization code for the
        grant it will issue)."""
        grant = flow.call.grant_type
        if self.grants is None or grant not in ALLOWLISTED_GRANTS:
            return None
        token = single_field(flow.fields, "refresh_token" if grant == "refresh_token" else "code")
        h = self.grants.token_key(token) if token else None
        if h is None:
            return None
        if grant == "authorization_code":
            return self.facts.grant(h)
        just = self._issued.get(h)
        if just is not None:
            return just
        found = await self.grants.grant_shared(h)
        if found is None:
            return self.facts.grant(h)
        key, identity = found
        return self.facts.org(identity) if identity is not None else self.facts.grant(key)

    def upstream_answer(self, flow: TokenFlow, member: Member) -> None:
        """What Salesforce said about the IP the call left from (verified on its connection, or probed)."""
        outcome = flow.call.outcome
        if outcome == "ip_restricted":
            if self.facts.record(flow.app, flow.org, flow.egress_ip, "refused") and flow.egress_ip:
                flow.metadata.setdefault("evidence_news", []).append(flow.egress_ip)
        elif outcome == "success":
            issued, identity = grant_of(flow.answer) if flow.answer is not None else (None, None)
            if identity is not None:  # the org and user Salesforce named: the grant's from now on
                org = self.facts.org(identity)
                self.facts.learnt(flow.app, flow.org, org)
                flow.org = org
                h = self.grants.token_key(issued) if issued and self.grants is not None else None
                if h is not None:
                    self._issued[h] = org
                    while len(self._issued) > RECENT_TOKENS:
                        self._issued.popitem(last=False)
            if flow.call.grant_type in ALLOWLISTED_GRANTS:
                self.facts.record(flow.app, flow.org, flow.egress_ip, "allowed")

    def done(self, flow: TokenFlow) -> None:
        """Say what a new refusal means, now that the call's org may be known (from its retry's answer)."""
        for ip in flow.metadata.pop("evidence_news", ()):
            self.facts.announce(flow.app, flow.org, ip)
