"""The route of everything that is not a token call: direct, or through a pair member.

One decision that every entry point asks (the front door's tunnels, the lane's forwarded requests, plain
proxy requests): ``SIDECAR_ROUTE=token`` (the default) sends only token calls through the pair, so the
app's other traffic does not use QuotaGuard's metered bandwidth; ``salesforce`` also sends the app's
other requests to token hosts through it; ``all`` sends everything. A tunnel to a Salesforce-owned domain
that is not a token host (Lightning, Visualforce, sites: the sidecar cannot read it) goes through the pair
too unless ``SIDECAR_SALESFORCE_TUNNELS=direct``, so its egress is static. Token calls are routed by the
guard (``addons/guard.py``), never here.
"""

from __future__ import annotations

from sidecar.egress.guard import Guard
from sidecar.egress.pair import Member


class Routes:
    def __init__(self, guard: Guard, mode: str, salesforce_tunnels: str = "pair") -> None:
        self.guard = guard
        self.mode = mode  # SIDECAR_ROUTE
        self.salesforce_tunnels = salesforce_tunnels  # SIDECAR_SALESFORCE_TUNNELS

    def member_for(self, on_token_host: bool) -> Member | None:
        """The member a connection or request that is not a token call goes through; None: direct."""
        if self.guard.pair.direct:
            return None
        if self.mode == "all" or (self.mode == "salesforce" and on_token_host):
            return self.guard.choose("other").member
        return None

    def tunnel_member(self, salesforce: bool) -> Member | None:
        """The member a tunnel relayed without interception goes through (``salesforce``: to a
        Salesforce-owned domain); None: direct."""
        if salesforce and self.salesforce_tunnels == "pair" and not self.guard.pair.direct:
            return self.guard.choose("other").member
        return self.member_for(on_token_host=False)
