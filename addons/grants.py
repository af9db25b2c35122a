"""Refresh token hygiene: follow every grant across rotations, and say when an app reuses a token it
should have replaced or lets a grant go idle.

Under Refresh Token Rotation Salesforce invalidates a refresh token the moment it is redeemed; an app that
does not persist the new one breaks its grant on the next refresh, and a grant unused for 30 days expires.
This addon hands each finished call to the tracker (:class:`sidecar.state.grants.GrantTracker`), which
keeps keyed hashes only, never a token, and never changes a call.
"""

from __future__ import annotations

from sidecar.state.grants import GrantTracker
from sidecar.token.flow import TokenFlow


class Grants:
    def __init__(self, tracker: GrantTracker) -> None:
        self.tracker = tracker

    def answered(self, flow: TokenFlow) -> None:  # (not batched: another replica may need the rotation at once)
        self.tracker.on_call(flow.call, flow.request, flow.answer)
