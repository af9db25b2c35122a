"""Every Prometheus metric the sidecar exports is defined here, and only here.

Label values come from small fixed sets or from the pair itself (a handful of member addresses and
their static IPs): never a raw host, path, token or customer org.
"""

from __future__ import annotations

import platform
import time
from collections import Counter as Tally
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from sidecar import __version__
from sidecar.net.streams import HANDSHAKE_FAILURES
from sidecar.token.hosts import DOMAIN_CLASSES

# `*_created` series double the output and no alert or dashboard here uses them.
disable_created_metrics()

NS = "egress_sidecar"

GRANT_TYPES = ("refresh_token", "authorization_code", "jwt_bearer", "client_credentials", "password", "other")
OUTCOMES = (
    "success",
    "ip_restricted",
    "invalid_grant",
    "client_error",
    "server_error",
    "upstream_error",
    "blocked",
)
# member label for calls that did not go through a pair member.
MEMBER_DIRECT = "direct"
MEMBER_NONE = "none"
EGRESS_UNKNOWN = "unknown"
EGRESS_NONE = "none"
EGRESS_UNVERIFIED = "unverified"  # through a member whose connection's egress IP is not known
FAILURE_REASONS = ("refused", "unreachable", "timeout", "proxy_error", "auth_failed", "reset")
TUNNEL_ROUTES = ("pair", "direct")
# A member's probe round: its samples agreed, disagreed, only the echo behind it failed, or the member failed.
PROBE_RESULTS = ("ok", "unstable", "echo_failed", "member_down")
# Why the front door refused a client connection: the SIDECAR_MAX_CONNECTIONS cap, or a client not on
# loopback without SIDECAR_PROXY_AUTH.
CONNECTION_REFUSALS = ("max_connections", "not_loopback")
# Why an audit record was not written (sidecar.state.audit), and a grant's place against its org's expiry.
AUDIT_DROPS = ("queue_full", "write_failed", "disk_full")
EXPIRY_STATES = ("expiring", "expired")


def _dist_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


class Metrics:
    """One registry per running sidecar (the demo runs two in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # What operators expect from any exporter, on this registry (not the global default one, so two
        # sidecars in one process each export them): process_* (CPU, RSS, open fds, start time) and
        # python_info, from prometheus-client's own collectors.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build_info = Gauge(
            f"{NS}_build_info",
            "Always 1; the labels say which egress-sidecar, Python and mitmproxy this process runs.",
            ("version", "python", "mitmproxy"),
            registry=r,
        )
        self.build_info.labels(__version__, platform.python_version(), _dist_version("mitmproxy")).set(1)
        self.token_requests = Counter(
            f"{NS}_token_requests_total",
            "Salesforce token calls by grant type, pair member, egress IP and outcome.",
            ("grant_type", "member", "egress_ip", "outcome"),
            registry=r,
        )
        self.token_duration = Histogram(
            f"{NS}_token_request_duration_seconds",
            "Time from the token request's first byte to the response's last byte, per member.",
            ("member", "egress_ip"),
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.tunnels = Counter(
            f"{NS}_tunnels_total",
            "CONNECT tunnels relayed without interception, by route (pair or direct).",
            ("route",),
            registry=r,
        )
        self.salesforce_tunnels = Counter(
            f"{NS}_salesforce_tunnels_total",
            "Tunnels to Salesforce-owned domains that are not token hosts, relayed without interception (the "
            "sidecar cannot read them), by domain class and route (pair or direct).",
            ("domain_class", "route"),
            registry=r,
        )
        for domain_class in DOMAIN_CLASSES:  # at 0 from the start: increase() cannot see a series' first step
            for route in TUNNEL_ROUTES:
                self.salesforce_tunnels.labels(domain_class, route)
        self.intercepted = Counter(
            f"{NS}_intercepted_connections_total",
            "Client connections to token hosts whose TLS the sidecar intercepted.",
            registry=r,
        )
        self.egress_allowlisted = Gauge(
            f"{NS}_egress_ip_allowlisted",
            "1 if this observed egress IP is on the configured allowlist, else 0.",
            ("egress_ip",),
            registry=r,
        )
        self.member_up = Gauge(
            f"{NS}_pair_member_up",
            "1 if the pair member answered its last probe round (even when only the IP echo behind it failed), 0 if "
            "it could not be reached or refused the credentials; absent until its first round.",
            ("member", "egress_ip"),
            registry=r,
        )
        self.egress_changes = Counter(
            f"{NS}_egress_ip_changes_total",
            "Times a pair member's observed egress IP changed.",
            ("member",),
            registry=r,
        )
        self.allowlist_coverage = Gauge(
            f"{NS}_allowlist_coverage_ratio",
            "Share of observed egress IPs that are on SIDECAR_ALLOWLIST (0..1); NaN when no allowlist is typed.",
            registry=r,
        )
        self.probes = Counter(
            f"{NS}_probes_total",
            "Egress probe rounds per pair member, by result: ok, unstable (samples disagreed), echo_failed (the "
            "member answered, the IP echo behind it did not: the member is up), member_down (connect or proxy "
            "auth failed).",
            ("member", "result"),
            registry=r,
        )
        self.egress_verified = Gauge(
            f"{NS}_egress_verified",
            "1 while the egress IP of each new connection through this pair member is asked on that connection "
            "(and the guard judges it), 0 while its connections go unverified (the echo failed, the member refused "
            "a CONNECT after a request, its connections did not keep one egress IP, or the echo URL is https).",
            ("member",),
            registry=r,
        )
        self.egress_checks = Counter(
            f"{NS}_egress_checks_total",
            "Egress checks per pair member, by result: verified (a new connection's egress IP was asked on it), "
            "echo_failed, connect_refused (the member would not open a tunnel after the question), disagreed (two "
            "answers on one probed connection differed).",
            ("member", "result"),
            registry=r,
        )
        self.member_failures = Counter(
            f"{NS}_member_failures_total",
            "Failures to open a connection through a pair member, by reason.",
            ("member", "reason"),
            registry=r,
        )
        self.failovers = Counter(
            f"{NS}_failovers_total",
            "Moves of a token call to another member (before any byte of it was sent).",
            registry=r,
        )
        self.rotations = Counter(
            f"{NS}_refresh_token_rotations_total",
            "Successful refresh_token redemptions, by whether a new refresh token came back.",
            ("rotated",),
            registry=r,
        )
        self.reuse = Counter(
            f"{NS}_refresh_token_reuse_total",
            "Redemptions of a refresh token that had already been rotated away (app did not persist).",
            registry=r,
        )
        self.grants_idle = Gauge(
            f"{NS}_grants_idle",
            "Tracked grants whose last redemption is older than the window.",
            ("window",),
            registry=r,
        )
        self.grants_tracked = Gauge(f"{NS}_grants_tracked", "Grants (rotation chains) tracked.", registry=r)
        self.grant_writes_dropped = Counter(
            f"{NS}_grant_store_writes_dropped_total",
            "Grant changes not written to grants.sqlite3 (writer queue full or SQLite error); a restart may forget them.",
            registry=r,
        )
        self.grants_expiry = Gauge(
            f"{NS}_grants_expiry",
            "Tracked grants idle past the warning point of their org's refresh token expiry (state=expiring) or past the "
            "expiry itself (state=expired), each judged by its org's expiry (SIDECAR_IDLE_POLICY).",
            ("state",),
            registry=r,
        )
        for state in EXPIRY_STATES:
            self.grants_expiry.labels(state)
        self.orgs = Gauge(f"{NS}_orgs", "Customer orgs in the per-org table of /status: named by a token answer since "
                          "start, or owning a tracked grant.", registry=r)
        self.audit_writes_dropped = Counter(
            f"{NS}_audit_writes_dropped_total",
            "Audit records not written to audit.sqlite3, by reason: queue_full (the writer fell behind), write_failed "
            "(SQLite failed), disk_full. Each call's log line still carries its record.",
            ("reason",),
            registry=r,
        )
        for reason in AUDIT_DROPS:  # at 0 from the start: increase() cannot see a series' first step
            self.audit_writes_dropped.labels(reason)
        self.records_applied_early = Counter(
            f"{NS}_records_applied_early_total",
            "Token call records (log line, metrics, audit row, grant tracking) applied at once because the queue of "
            "finished calls waiting for their batch was full (sidecar.token.bookkeeping). None is dropped; a steady "
            "rise means calls finish faster than the batches are applied.",
            registry=r,
        )
        self.guard_enforcing = Gauge(
            f"{NS}_guard_enforcing", "1 when the allowlist guard enforces, 0 when it observes.", registry=r
        )
        self.direct_mode = Gauge(
            f"{NS}_direct_mode",
            "1 when no QuotaGuard upstream is configured (token calls leave from this host's IP).",
            registry=r,
        )
        self.egress_ip_refused = Gauge(
            f"{NS}_egress_ip_refused",
            "Apps (client_ids) for which Salesforce refuses this egress IP as \"ip restricted\" and no org has "
            "redeemed through it since: refused for enough orgs (SIDECAR_APP_REFUSAL_ORGS), or for fewer with no "
            "success through it yet. Held until a success through the IP (re-tested every SIDECAR_EVIDENCE_TTL).",
            ("egress_ip",),
            registry=r,
        )
        self.egress_ip_org_refused = Gauge(
            f"{NS}_egress_ip_org_refused",
            "Customer orgs whose own IP restrictions refuse this egress IP while other orgs of the same app redeem "
            "through it (the fix is on the customer's side; /status names them). Held until a success.",
            ("egress_ip",),
            registry=r,
        )
        self.allowlist_disagreement = Gauge(
            f"{NS}_allowlist_disagreement",
            "1 when SIDECAR_ALLOWLIST and Salesforce's answers disagree about this egress IP (listed but refused, "
            "or not listed but accepted), else 0.",
            ("egress_ip",),
            registry=r,
        )
        self.ip_restricted_retries = Counter(
            f"{NS}_ip_restricted_retries_total",
            "Token calls refused as \"ip restricted\" and sent once more through another egress IP, by the outcome "
            "of that second attempt.",
            ("outcome",),
            registry=r,
        )
        for outcome in OUTCOMES:  # at 0 from the start: increase() cannot see a series' first step
            self.ip_restricted_retries.labels(outcome)
        self.shield_answers = Counter(
            f"{NS}_shield_answers_total",
            "Refresh token redemptions the rotation shield answered without sending them: coalesced (an identical "
            "one was in flight) or replayed (an identical one succeeded within SIDECAR_REPLAY_WINDOW).",
            ("kind",),
            registry=r,
        )
        for kind in ("coalesced", "replayed"):
            self.shield_answers.labels(kind)
        self.shield_uncoordinated = Counter(
            f"{NS}_shield_uncoordinated_total",
            "Refresh token redemptions sent while the Redis the replicas share (SIDECAR_REDIS_URL) stayed unreachable "
            "past the wait: sent by this replica alone, not coordinated with the others (as without the sidecar).",
            registry=r,
        )
        self._redis_up: Gauge | None = None
        self.client_tls_failures = Counter(
            f"{NS}_client_tls_failures_total",
            "Client TLS handshakes with the sidecar that failed, by reason (unknown_ca: the client does not trust "
            "the sidecar's CA; client_closed; protocol_error; other).",
            ("reason",),
            registry=r,
        )
        for reason in HANDSHAKE_FAILURES:  # at 0 from the start: increase() cannot see a series' first step
            self.client_tls_failures.labels(reason)
        self.tls_failures_seen: Tally[str] = Tally()  # for /status, since start
        self.tls_failure_last: float | None = None
        self.client_connections = Gauge(
            f"{NS}_client_connections",
            "Client connections open at the proxy now (what SIDECAR_MAX_CONNECTIONS caps).",
            registry=r,
        )
        self.connections_refused = Counter(
            f"{NS}_connections_refused_total",
            "Client connections the proxy refused, by reason: max_connections (SIDECAR_MAX_CONNECTIONS reached: "
            "503 too_many_connections), not_loopback (a client from another host without SIDECAR_PROXY_AUTH).",
            ("reason",),
            registry=r,
        )
        for reason in CONNECTION_REFUSALS:  # at 0 from the start: increase() cannot see a series' first step
            self.connections_refused.labels(reason)
        self.ready = Gauge(f"{NS}_ready", "1 while the proxy listens and is not draining (/serving); see /readyz for whether "
                           "a refresh could be routed.", registry=r)

    @property
    def redis_up(self) -> Gauge:
        """Registered only when SIDECAR_REDIS_URL is set: a sidecar without Redis exports no such series."""
        if self._redis_up is None:
            self._redis_up = Gauge(f"{NS}_redis_up", "1 while the Redis the replicas share (SIDECAR_REDIS_URL) "
                                   "answers, 0 while the sidecar serves on its local state.", registry=self.registry)
        return self._redis_up

    def client_tls_failed(self, reason: str) -> None:
        self.client_tls_failures.labels(reason).inc()
        self.tls_failures_seen[reason] += 1
        self.tls_failure_last = time.time()

    def render(self) -> bytes:
        return generate_latest(self.registry)
