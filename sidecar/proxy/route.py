"""The route of everything that is not a token call: direct, or through a pair member.

One decision that every entry point asks (the front door's tunnels, the lane's forwarded requests, plain
proxy requests): ``SIDECAR_ROUTE=token`` (the default) sends only token calls through the pair, so the
app's other traffic does not use QuotaGuard's metered bandwidth; ``salesforce`` also sends the app's
other requests to token hosts through it; ``all`` sends everything. Token calls are routed by the guard
(``addons/guard.py``), never here.
"""

from __future__ import annotations

from sidecar.egress.guard import Guard
from sidecar.egress.pair import Member


class Routes:
    def __init__(self, guard: Guard, mode: str) -> None:
        self.guard = guard
        self.mode = mode  # SIDECAR_ROUTE

    def member_for(self, on_token_host: bool) -> Member | None:
        """The member a connection or request that is not a token call goes through; None: direct."""
        if self.guard.pair.direct:
            return None
        if self.mode == "all" or (self.mode == "salesforce" and on_token_host):
            return self.guard.choose("other").member
        return None
