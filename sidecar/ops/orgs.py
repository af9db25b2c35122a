"""The per-org view of ``/status`` and the status page: for an ISV with hundreds of customer orgs, which orgs
the sidecar has seen, the egress IPs their calls left from, Salesforce's refusals, idle grants and the
last redemption.

What it is built from: the calls since start (:class:`OrgsSeen`, fed by the audit addon: bounded, the
least recently seen org forgotten first), the tracked grants per org (the grant tracker's summary, kept
across restarts), and the egress IPs Salesforce currently refuses for an org (the evidence). Paged, so a
page and ``/status`` stay small whatever the number of orgs; the full history is ``egress-sidecar audit
--summary``. Org ids are Salesforce record ids (not secrets); they are never metric labels (only their
count is: ``egress_sidecar_orgs``).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

from sidecar.egress.evidence import Finding
from sidecar.metrics import Metrics
from sidecar.state.expiry import IdlePolicy
from sidecar.state.grants import OrgGrants

MAX_ORGS = 10_000  # orgs remembered from the calls since start; the least recently seen is forgotten first
MAX_IPS_PER_ORG = 16
MAX_APPS_PER_ORG = 8
PER_PAGE = 50
REDEMPTIONS = frozenset({"refresh_token", "authorization_code"})


@dataclass(slots=True)
class OrgCalls:
    """One org's calls since start."""

    apps: list[str] = field(default_factory=list)
    by_ip: dict[str, Counter[str]] = field(default_factory=dict)  # egress IP -> outcome counts
    calls: int = 0
    refusals: int = 0  # "ip restricted" answers (a retried call's first answer included)
    first: float = 0.0
    last: float = 0.0
    last_redemption: float | None = None  # the last successful refresh_token / authorization_code call


class OrgsSeen:
    """Thread-safe: the audit addon adds on the event loop, the admin server reads from its threads."""

    def __init__(self, metrics: Metrics | None = None, max_orgs: int = MAX_ORGS) -> None:
        self.metrics = metrics
        self.max_orgs = max_orgs
        self._orgs: OrderedDict[str, OrgCalls] = OrderedDict()  # least recently seen first
        self._lock = threading.Lock()
        self._grant_orgs: frozenset[str] = frozenset()

    def saw(self, org: str, app: str | None, egress_ip: str, outcome: str, grant_type: str, at: float,
            retried_from: str | None = None) -> None:
        """One finished call of ``org``."""
        with self._lock:
            seen = self._orgs.get(org)
            new = seen is None
            if seen is None:
                if len(self._orgs) >= self.max_orgs:
                    self._orgs.popitem(last=False)
                seen = self._orgs[org] = OrgCalls(first=at)
            else:
                self._orgs.move_to_end(org)
            seen.calls += 1
            seen.last = max(seen.last, at)
            if app and app not in seen.apps and len(seen.apps) < MAX_APPS_PER_ORG:
                seen.apps.append(app)
            _count(seen, egress_ip, outcome)
            if retried_from:
                _count(seen, retried_from, "ip_restricted")
            if outcome == "success" and grant_type in REDEMPTIONS:
                seen.last_redemption = max(seen.last_redemption or 0.0, at)
        if new:
            self.update_gauge()

    def grant_orgs(self, orgs: frozenset[str]) -> None:
        """The orgs that own tracked grants (after each grant maintenance round)."""
        self._grant_orgs = orgs
        self.update_gauge()

    def update_gauge(self) -> None:
        if self.metrics is not None:
            with self._lock:
                n = len(self._grant_orgs | self._orgs.keys())
            self.metrics.orgs.set(n)

    def snapshot(self) -> dict[str, OrgCalls]:
        with self._lock:
            return {org: OrgCalls(list(c.apps), {ip: Counter(n) for ip, n in c.by_ip.items()}, c.calls, c.refusals,
                                  c.first, c.last, c.last_redemption) for org, c in self._orgs.items()}


def _count(seen: OrgCalls, ip: str, outcome: str) -> None:
    if outcome == "ip_restricted":
        seen.refusals += 1
    counts = seen.by_ip.get(ip)
    if counts is None:
        if len(seen.by_ip) >= MAX_IPS_PER_ORG:
            return
        counts = seen.by_ip[ip] = Counter()
    counts[outcome] += 1


def org_table(seen: dict[str, OrgCalls], grants: dict[str | None, OrgGrants], findings: list[Finding],
              policy: IdlePolicy, page: int = 1, per_page: int = PER_PAGE, now: float | None = None) -> dict[str, Any]:
    """One page of the per-org table: the orgs that need attention first (a refusal, an IP Salesforce refuses
    for them, grants close to or past their expiry), then the others, each group by org id."""
    now = time.time() if now is None else now
    refused: dict[str, set[str]] = {}
    for f in findings:
        if f.kind == "refused":
            for label in f.orgs:
                if label.startswith("org "):
                    refused.setdefault(label[4:], set()).add(f.egress_ip)
    orgs = sorted(set(seen) | {o for o in grants if o is not None})
    rows = [_row(org, seen.get(org), grants.get(org), refused.get(org, set()), policy, now) for org in orgs]
    rows.sort(key=lambda r: (not r["attention"], r["org"]))
    pages = max(1, -(-len(rows) // per_page))
    page = min(max(1, page), pages)
    unnamed = grants.get(None)
    return {"total": len(rows), "attention": sum(1 for r in rows if r["attention"]), "page": page, "pages": pages,
            "per_page": per_page, "rows": rows[(page - 1) * per_page:page * per_page],
            "grants_without_org": unnamed.grants if unnamed else 0}


def _row(org: str, calls: OrgCalls | None, grants: OrgGrants | None, refused_ips: set[str], policy: IdlePolicy,
         now: float) -> dict[str, Any]:
    last = max([t for t in (calls.last_redemption if calls else None, grants.last_used if grants else None) if t] or
               [0.0]) or None
    expiring, expired = (grants.expiring, grants.expired) if grants else (0, 0)
    refusals = calls.refusals if calls else 0
    warning = None
    if expired or expiring:
        warning = (f"{expired} grant(s) past the org's refresh token expiry ({policy.describe(org)})" if expired else
                   f"{expiring} grant(s) close to the org's refresh token expiry ({policy.describe(org)})")
    return {
        "org": org,
        "apps": calls.apps if calls else [],
        "egress_ips": {ip: dict(n) for ip, n in sorted(calls.by_ip.items())} if calls else {},
        "calls": calls.calls if calls else 0,
        "refusals": refusals,
        "refused_ips": sorted(refused_ips),
        "grants": grants.grants if grants else 0,
        "grants_expiring": expiring,
        "grants_expired": expired,
        "expiry": policy.describe(org),
        "idle_warning": warning,
        "last_redemption": None if last is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last)),
        "last_redemption_age_seconds": None if last is None else round(max(0.0, now - last)),
        "attention": bool(refusals or refused_ips or expiring or expired),
    }
