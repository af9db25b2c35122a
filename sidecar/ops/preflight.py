"""``egress-sidecar check``: the preflight. Probes the pair once and judges it against the allowlist,
and, when a sidecar is running (its admin server answers), against what Salesforce answered it.

A deploy gate: it passes only when every observed egress IP is allowlisted, every member is reachable
and stable, the running sidecar has no refusal from Salesforce on record, and the environment's
``NO_PROXY`` sends no Salesforce host around the sidecar, because anything less means some refresh token
redemptions fail (or are kept off an IP, leaving no redundancy, or never reach the sidecar).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar.config import Settings
from sidecar.egress.discovery import Prober
from sidecar.egress.guard import Guard
from sidecar.egress.pair import build_pair
from sidecar.egress.verify import Verifier
from sidecar.metrics import Metrics
from sidecar.ops.noproxy import bypass_warnings
from sidecar.ops.status import member_rows, verdict, with_egress_checks


@dataclass
class Report:
    ok: bool
    mode: str
    rows: list[dict[str, Any]]
    level: str
    lines: list[str]
    allowlist: str | None
    running: str | None = None  # the running sidecar's admin URL, when it answered
    evidence: list[dict[str, Any]] = field(default_factory=list)
    layout: str = "unknown"  # QuotaGuard's layout, as the probes showed it

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "mode": self.mode,
            "pair": self.rows,
            "allowlist": self.allowlist,
            "layout": self.layout,
            "running_sidecar": self.running,
            "evidence": self.evidence,
            "verdict": {"level": self.level, "lines": self.lines},
        }

    def as_text(self) -> str:
        head = ("MEMBER", "EGRESS IP", "STABLE", "ALLOWLISTED", "REACHABLE")
        table = [head] + [
            (
                r["member"],
                r["egress_ip"] or ", ".join(r["observed_ips"]) or "unknown",
                _word(r["stable"]),
                _word(r["allowlisted"]),
                _word(r["up"]),
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
        out.append("")
        out.append(f"QuotaGuard layout: {self.layout}")
        out.append(("PASS: " if self.ok else "FAIL: ") + self.lines[0])
        out.extend("      " + line for line in self.lines[1:])
        return "\n".join(out)


def _word(value: object) -> str:
    return {True: "yes", False: "no", None: "unknown"}.get(value, str(value))  # type: ignore[call-overload]


def running_evidence(admin_url: str, timeout: float = 3.0) -> tuple[list[dict[str, Any]], list[str], list[str]] | None:
    """A running sidecar's evidence and its verdict lines about it, from its /status; None when no
    sidecar answers there."""
    try:
        with urllib.request.urlopen(admin_url.rstrip("/") + "/status", timeout=timeout) as resp:
            status = json.loads(resp.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None
    if not isinstance(status, dict) or "verdict" not in status:
        return None
    lines = [line for line in status["verdict"].get("lines", []) if line.startswith("Salesforce ")]
    unverified = [f"The running sidecar at {admin_url}: {line}" for line in status["verdict"].get("lines", [])
                  if "is unverified" in line]
    return list(status.get("evidence") or []), lines, unverified


async def run_check(settings: Settings, admin_url: str | None = None,
                    environ: Mapping[str, str] | None = None) -> Report:
    pair = build_pair(settings)
    # The preflight judges the allowlist itself, as if no guard were routing around a gap.
    guard = Guard(pair, settings.allowlist_ranges, "observe")
    metrics = Metrics()
    verifier = Verifier(pair, settings.echo_url, metrics)
    if not pair.direct:
        await Prober(pair, guard, metrics, settings, verifier).probe_all()
    v = with_egress_checks(verdict(pair, guard), pair, verifier)
    allowlist = guard.allowlist
    ok = (
        not pair.direct
        and bool(allowlist)
        and all(m.up and (m.stable or m.verifies) and m.observed_ips
                and all(allowlist.contains(ip) for ip in m.observed_ips) for m in pair.members)
    )
    lines, level = list(v.lines), v.level
    running = running_evidence(admin_url) if admin_url else None
    evidence: list[dict[str, Any]] = []
    if running is not None:
        evidence, said, unverified = running
        if unverified:
            ok, level, lines = False, "critical" if level == "critical" else "warning", [*lines, *unverified]
        if any(r.get("evidence") == "refused" for r in evidence) or said:
            ok, level, lines = False, "critical", [*said, *lines]
        else:
            lines.append(f"The running sidecar at {admin_url} has no refusal from Salesforce on record "
                         f"({sum(r.get('evidence') == 'allowed' for r in evidence)} accepted app/IP pairs).")
    bypass = bypass_warnings(os.environ if environ is None else environ, settings.token_hosts)
    if bypass:
        ok, level, lines = False, "critical", [*bypass, *lines]
    return Report(
        ok=ok,
        mode="direct" if pair.direct else "pair",
        rows=member_rows(pair, guard),
        level=level,
        lines=lines,
        allowlist=str(allowlist) if allowlist else None,
        running=admin_url if running is not None else None,
        evidence=evidence,
        layout=verifier.layout() if not pair.direct else "none (direct mode)",
    )
