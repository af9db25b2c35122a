"""The audit trail: every token call, per customer org, kept so an ISV can prove which egress IP redeemed
which grant (Salesforce's security review, a customer's auditor).

After the app has its answer, this addon names the call's org and user (``flow.org``: from the grant
it redeemed, or the answer's ``id``) and its grant (the id ``egress-sidecar grants`` shows: the keyed hash
of the chain's first token, never a token) on the call's record, so the canonical log line carries them
(the record addon writes it next), and hands the record to the audit store (:mod:`sidecar.state.audit`:
a bounded queue, written by a background thread; a record that cannot be queued is counted and
logged) and to the per-org view (:mod:`sidecar.ops.orgs`). It never changes a call and never waits.

The grant is found as the grant tracker will file it: the tracker's grant for the refresh token presented,
or, for a token issued by an answer just now, the grant that answer continued (kept here: the next
redemption may finish before the tracker has taken in the rotation), or a new grant keyed by the token
itself.
"""

from __future__ import annotations

from collections import OrderedDict

from sidecar.ops.orgs import OrgsSeen
from sidecar.state.audit import AuditStore, Entry
from sidecar.state.grants import GrantTracker
from sidecar.state.sqlite import GRANT_ID_HEX
from sidecar.token.call import client_id, single_field
from sidecar.token.flow import TokenFlow
from sidecar.token.messages import grant_of

RECENT_TOKENS = 10_000  # refresh tokens just issued (as keyed hashes), with the grant each continues
MAX_CLIENT_ID = 255  # a consumer key is about 85 characters; a made-up longer one is kept cut


class Audit:
    def __init__(self, store: AuditStore | None, grants: GrantTracker, orgs: OrgsSeen | None = None) -> None:
        self.store = store
        self.grants = grants
        self.orgs = orgs
        self._issued: OrderedDict[bytes, bytes] = OrderedDict()

    def done(self, flow: TokenFlow) -> None:
        try:
            self._record(flow)
        except Exception as exc:  # noqa: BLE001 - a record lost to a bug is counted and said, like any other
            if self.store is None:
                raise  # (the hooks log it)
            self.store.lost(f"the audit addon failed ({type(exc).__name__})")

    def _record(self, flow: TokenFlow) -> None:
        call = flow.call
        if call.outcome is None:
            return
        org = flow.org
        if org is not None and org.id is not None:
            call.org, call.user = org.id, org.user
        call.grant = self._grant(flow)
        if self.store is not None:
            request = flow.request
            self.store.submit(Entry(
                call.started, self._client_id(flow), call.app, call.org, call.user, call.grant, call.grant_type,
                request.host if request is not None else None, call.host_class, call.egress_ip, call.egress,
                call.member, call.route, call.guard, call.outcome, call.status, call.error_code,
                call.retried_from[1] if call.retried_from else None, call.shielded,
                None if call.duration is None else round(call.duration * 1000, 2)))
        if call.org is not None and self.orgs is not None:
            self.orgs.saw(call.org, call.app, call.egress_ip, call.outcome, call.grant_type, call.started,
                          call.retried_from[1] if call.retried_from else None)

    def _grant(self, flow: TokenFlow) -> str | None:
        call, key, presented = flow.call, None, None
        token = single_field(flow.fields, "refresh_token") if call.grant_type == "refresh_token" else None
        if token:
            presented = self.grants.token_key(token)
            if presented is None:  # (the tracker is not open)
                return None
            key = self._issued.get(presented) or self._filed(presented)
        if call.outcome == "success" and flow.answer is not None:
            issued = grant_of(flow.answer)[0]
            h = self.grants.token_key(issued) if issued else None
            if h is not None and h != presented:
                key = key or self._filed(h)  # (a new grant: web server flow, device flow, ...)
                self._issued[h] = key
                if len(self._issued) > RECENT_TOKENS:
                    self._issued.popitem(last=False)
        return key.hex()[:GRANT_ID_HEX] if key is not None else None

    def _filed(self, h: bytes) -> bytes:
        """The grant the tracker files a token under: its chain's, or (a token it has not seen) its own."""
        found = self.grants.grant_of(h)
        return found[0] if found is not None else h

    @staticmethod
    def _client_id(flow: TokenFlow) -> str | None:
        found = client_id(flow.fields, flow.authorization)
        return found[:MAX_CLIENT_ID] if found is not None else None
