"""Refresh token hygiene: follow every grant across rotations, and say when an app reuses a token it
should have replaced or lets a grant go idle.

Under Refresh Token Rotation Salesforce invalidates a refresh token the moment it is redeemed; an app that
does not persist the new one breaks its grant on the next refresh, and a grant unused for 30 days expires.
This addon hands each finished call to the tracker (:class:`sidecar.state.grants.GrantTracker`), which
keeps keyed hashes only, never a token, and never changes a call.

When: with the batched records (``done``), alone; with replicas on Redis, as soon as the answer went out
(``answered``): the app may redeem the rotated token on another replica milliseconds later, and that
replica must find it on Redis under the same grant. (Alone, the batch costs less per call and nobody else
asks.)
"""

from __future__ import annotations

from sidecar.state.grants import GrantTracker
from sidecar.token.flow import TokenFlow


class Grants:
    def __init__(self, tracker: GrantTracker) -> None:
        self.tracker = tracker

    def answered(self, flow: TokenFlow) -> None:
        if self.tracker.shared is not None:
            self.tracker.on_call(flow.call, flow.request, flow.answer)

    def done(self, flow: TokenFlow) -> None:
        if self.tracker.shared is None:
            self.tracker.on_call(flow.call, flow.request, flow.answer)
