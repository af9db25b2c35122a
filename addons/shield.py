"""The rotation shield: one redemption per refresh token, its answer given to everyone who asked.

Under Refresh Token Rotation a redeemed refresh token is dead. Two workers redeeming the same one at
once, or an app that timed out while Salesforce answered, end with a spent token and a customer who
must authorise again. While a redemption is in flight an identical one waits and gets the same answer
(coalesced); one that succeeded within ``SIDECAR_REPLAY_WINDOW`` is answered again without being sent
(replayed); with Redis, across replicas. "Identical" is the same token host, form fields and client
credentials, as a keyed hash. The machinery is :class:`sidecar.token.shield.Shield`.
"""

from __future__ import annotations

from sidecar.metrics import EGRESS_NONE, MEMBER_NONE
from sidecar.token import answers
from sidecar.token.flow import TokenFlow
from sidecar.token.shield import Contended, Lead, Shield, request_key


class RotationShield:
    def __init__(self, shield: Shield) -> None:
        self.shield = shield

    async def request(self, flow: TokenFlow) -> None:
        key = self.shield.hash_key
        if flow.call.grant_type != "refresh_token" or key is None or flow.request is None:
            return
        try:
            got = await self.shield.begin(request_key(key, flow.fields, flow.authorization, flow.request.host))
        except Contended:
            got = answers.redemption_in_flight(), "coalesced"
        if isinstance(got, Lead):
            flow.metadata["shield"] = got  # this call sends it; the others wait for response()
            return
        answer, how = got  # another call's answer: nothing of this one is sent
        call = flow.call
        call.shielded = how
        call.route, call.member, call.egress_ip, call.guard = how, MEMBER_NONE, EGRESS_NONE, "allow"
        call.outcome = answers.local_outcome(answer)  # (None: Salesforce's answer, classified when finished)
        call.local = call.outcome is not None
        flow.answer = answer

    def response(self, flow: TokenFlow) -> None:
        """The answer is about to go to the app: the waiters here get it now; the other replicas get it
        through Redis just after the app (Shield.end)."""
        lead = flow.metadata.pop("shield", None)
        if lead is not None:
            assert flow.answer is not None
            self.shield.end(lead, flow.answer)

    def error(self, flow: TokenFlow) -> None:
        lead = flow.metadata.pop("shield", None)
        if lead is not None:
            self.shield.abort(lead, ConnectionError("the redemption was cancelled"))
