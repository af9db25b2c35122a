"""``egress-sidecar check``: the preflight. Probes the pair once and judges it against the allowlist.

A deploy gate: it passes only when every observed egress IP is allowlisted and every member is
reachable and stable, because anything less means some refresh token redemptions will fail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sidecar.config import Settings
from sidecar.discovery import Prober
from sidecar.guard import Guard
from sidecar.metrics import Metrics
from sidecar.pair import build_pair
from sidecar.status import member_rows, verdict


@dataclass
class Report:
    ok: bool
    mode: str
    rows: list[dict[str, Any]]
    level: str
    lines: list[str]
    allowlist: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "mode": self.mode,
            "pair": self.rows,
            "allowlist": self.allowlist,
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
        out.append(("PASS: " if self.ok else "FAIL: ") + self.lines[0])
        out.extend("      " + line for line in self.lines[1:])
        return "\n".join(out)


def _word(value: object) -> str:
    return {True: "yes", False: "no", None: "unknown"}.get(value, str(value))  # type: ignore[call-overload]


async def run_check(settings: Settings) -> Report:
    pair = build_pair(settings)
    # The preflight judges the allowlist itself, as if no guard were routing around a gap.
    guard = Guard(pair, settings.allowlist_ranges, "observe")
    if not pair.direct:
        await Prober(pair, guard, Metrics(), settings).probe_all()
    v = verdict(pair, guard)
    allowlist = guard.allowlist
    ok = (
        not pair.direct
        and bool(allowlist)
        and all(m.up and m.stable and allowlist.contains(m.egress_ip or "") for m in pair.members)
    )
    return Report(
        ok=ok,
        mode="direct" if pair.direct else "pair",
        rows=member_rows(pair, guard),
        level=v.level,
        lines=v.lines,
        allowlist=str(allowlist) if allowlist else None,
    )
