"""``egress-sidecar check``: the preflight. Probes the pair once and judges it against the allowlist,
and, when a sidecar is running (its admin server answers), with that sidecar's guard mode and against
what Salesforce answered it.

A deploy gate: it passes only when every member is reachable and stable, every observed egress IP may
carry refreshes (listed in ``SIDECAR_ALLOWLIST`` and not refused by Salesforce, or, with no list typed,
accepted by Salesforce for a redemption), no egress IP is refused for the app, and the environment's
``NO_PROXY`` sends no Salesforce host around the sidecar, because anything less means some refresh token
redemptions fail (or are kept off an IP, leaving no redundancy, or never reach the sidecar). One org's own
restriction (the fix is on the customer's side) is said, and does not fail the gate. It says plainly when
no running sidecar answered, and never prints a line its verdict contradicts.
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
from sidecar.egress.evidence import Finding
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
    guard: str = "observe"  # the guard mode the verdict was judged with
    layout: str = "unknown"  # QuotaGuard's layout, as the probes showed it

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "mode": self.mode,
            "guard": self.guard,
            "pair": self.rows,
            "allowlist": self.allowlist,
            "layout": self.layout,
            "running_sidecar": self.running,
            "evidence": self.evidence,
            "verdict": {"level": self.level, "lines": self.lines},
        }

    def as_text(self) -> str:
        head = ("MEMBER", "EGRESS IP", "STABLE", "REACHABLE", "ALLOWLISTED", "SALESFORCE")
        table = [head] + [
            (
                r["member"],
                r["egress_ip"] or ", ".join(r["observed_ips"]) or "unknown",
                _word(r["stable"]),
                _word(r["up"]),
                _word(r["allowlisted"]),
                _says(r.get("salesforce")),
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


def _says(says: dict[str, Any] | None) -> str:
    """The SALESFORCE column: what Salesforce's answers (of the running sidecar) say about the IP."""
    says = says or {}
    word = {"accepted": "yes", "refused": "refused"}.get(says.get("says"), "unknown")
    orgs = says.get("orgs_refused") or []
    return word + (f" (refused for {len(orgs)} org{'s' if len(orgs) > 1 else ''})" if orgs else "")


def running_status(admin_url: str, timeout: float = 3.0) -> dict[str, Any] | None:
    """A running sidecar's /status; None when no sidecar answers there."""
    try:
        with urllib.request.urlopen(admin_url.rstrip("/") + "/status", timeout=timeout) as resp:
            status = json.loads(resp.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None
    if not isinstance(status, dict) or "verdict" not in status:
        return None
    return status


async def run_check(settings: Settings, admin_url: str | None = None,
                    environ: Mapping[str, str] | None = None) -> Report:
    pair = build_pair(settings)
    running = running_status(admin_url) if admin_url else None
    # The guard mode the verdict speaks of: the running sidecar's, else the one these settings start with.
    mode = running.get("guard") if running is not None else None
    guard = Guard(pair, settings.allowlist_ranges, mode if mode in ("observe", "enforce") else settings.guard_mode)
    metrics = Metrics()
    verifier = Verifier(pair, settings.echo_url, metrics)
    if not pair.direct:
        await Prober(pair, guard, metrics, settings, verifier).probe_all()
    rows = list(running.get("evidence") or []) if running is not None else []
    findings = [f for r in rows if isinstance(r, dict) and (f := Finding.from_dict(r)) is not None]
    v = with_egress_checks(verdict(pair, guard, findings, strict=True), pair, verifier)
    lines, level = list(v.lines), v.level
    if running is not None:  # what the running sidecar met: connections whose egress it could not verify
        unverified = [f"The running sidecar at {admin_url}: {line}" for line in
                      (running.get("verdict") or {}).get("lines", []) if "is unverified" in line]
        if unverified:
            level = "critical" if level == "critical" else "warning"
            lines += unverified
    probed = all(m.up and ((m.stable and m.egress_ip) or (m.verifies and m.observed_ips)) for m in pair.members)
    ok = not pair.direct and level != "critical" and probed
    if ok and level != "ok":  # passes, with something to say: the first line says it passes
        lines.insert(0, f"Every egress IP ({', '.join(pair.egress_ips())}) may carry refreshes and every pair member "
                        "is up; to note:")
    if admin_url and running is None:
        lines.append(f"No running sidecar answered at {admin_url}: this check judged the probe and SIDECAR_ALLOWLIST "
                     "alone, not what Salesforce answered (pass --admin-url of a running sidecar to include it).")
    elif running is not None:
        lines.append(f"Judged with the guard mode ({guard.mode}) and the evidence of the running sidecar at {admin_url} "
                     f"({len(findings)} finding{'' if len(findings) == 1 else 's'} on record).")
    bypass = bypass_warnings(os.environ if environ is None else environ, settings.token_hosts)
    if bypass:
        ok, level = False, "critical"
        lines = [*bypass, *[line for line in lines if not line.startswith("Every egress IP (")]]
    return Report(
        ok=ok,
        mode="direct" if pair.direct else "pair",
        rows=member_rows(pair, guard, findings),
        level=level,
        lines=lines,
        allowlist=str(guard.allowlist) if guard.allowlist else None,
        running=admin_url if running is not None else None,
        evidence=rows,
        guard=guard.mode,
        layout=verifier.layout() if not pair.direct else "none (direct mode)",
    )
