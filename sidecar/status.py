"""What the operator sees: the pair, each egress IP's allowlist and health state, and a verdict in
plain words. One function builds it; /status, the status page, ``check`` and the demo all use it.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from sidecar import __version__
from sidecar.guard import Guard
from sidecar.pair import Pair

if TYPE_CHECKING:
    from sidecar.service import Sidecar

Level = Literal["ok", "warning", "critical"]


@dataclass(frozen=True)
class Verdict:
    level: Level
    lines: list[str]

    @property
    def text(self) -> str:
        return " ".join(self.lines)


def member_rows(pair: Pair, guard: Guard) -> list[dict[str, Any]]:
    now = time.time()
    return [
        {
            "member": m.label,
            "egress_ip": m.egress_ip,
            "observed_ips": m.observed_ips,
            "pinned": m.pinned_ip is not None,
            "stable": m.stable,
            "up": m.up,
            "allowlisted": guard.is_allowlisted(m.egress_ip),
            "last_probe_age_seconds": None if m.last_probe is None else round(now - m.last_probe, 1),
            "last_error": m.last_error,
        }
        for m in pair.members
    ]


def verdict(pair: Pair, guard: Guard) -> Verdict:
    if pair.direct:
        return Verdict(
            "warning",
            [
                "DIRECT MODE: QUOTAGUARDSTATIC_URL is not set, so token calls leave from this host's own IP "
                "and no static IP is in use."
            ],
        )
    lines: list[str] = []
    level: Level = "ok"
    n = len(pair.members)
    allowlisted_up = [m for m in pair.members if m.up is not False and guard.is_allowlisted(m.egress_ip)]
    for m in pair.members:
        if m.up is False:
            lines.append(f"Pair member {m.label} is unreachable ({m.last_error or 'no answer'}).")
            level = "critical"
        elif m.stable is False:
            lines.append(
                f"Pair member {m.label} is unstable: it left from {', '.join(m.observed_ips)}; "
                "its egress IP is not claimed. Allowlist every IP it uses."
            )
            level = "critical"
        elif m.egress_ip is None:
            lines.append(f"Egress IP of pair member {m.label} is not known yet (probe pending).")
            level = "critical" if level == "critical" else "warning"
    if not guard.allowlist:
        lines.append(
            "No allowlist is configured (SIDECAR_ALLOWLIST): set it to the entries of the External Client "
            "App's Refresh Token IP Allowlist so the sidecar can check the pair against it."
        )
        level = "critical" if level == "critical" else "warning"
    else:
        for ip in guard.missing_ips():
            share = "about half of" if n == 2 else "some"
            if guard.mode == "enforce":
                lines.append(
                    f"Egress IP {ip} is not on the allowlist: the guard keeps refresh token redemptions off it, "
                    "so you have no redundancy; add it in External Client App Manager."
                )
            else:
                lines.append(
                    f"Egress IP {ip} is not on the allowlist: {share} refresh token redemptions will fail; "
                    "add it in External Client App Manager."
                )
            level = "critical"
        if guard.mode == "enforce" and not allowlisted_up:
            lines.append("No pair member with an allowlisted egress IP is available: refresh calls are refused (503).")
            level = "critical"
    if not lines:
        ips = ", ".join(pair.egress_ips())
        lines.append(f"All {n} pair members are up and every egress IP ({ips}) is on the allowlist.")
    return Verdict(level, lines)


def build_status(sidecar: Sidecar) -> dict[str, Any]:
    s = sidecar.settings
    ready, why = sidecar.is_ready()
    v = verdict(sidecar.pair, sidecar.guard)
    upstream = s.upstream
    return {
        "version": __version__,
        "mode": "direct" if sidecar.pair.direct else "pair",
        "ready": ready,
        "ready_reason": why,
        "uptime_seconds": round(time.time() - sidecar.started, 1),
        "upstream": upstream.redacted() if upstream else None,
        "route": s.route,
        "guard": sidecar.guard.mode,
        "allowlist": str(sidecar.guard.allowlist) if sidecar.guard.allowlist else None,
        "missing_from_allowlist": sidecar.guard.missing_ips(),
        "pair": member_rows(sidecar.pair, sidecar.guard),
        "probe_rounds": sidecar.prober.rounds,
        "verdict": {"level": v.level, "lines": v.lines},
        **sidecar.recorder.snapshot(),
    }


_COLORS = {"ok": "#1b7f3a", "warning": "#a86500", "critical": "#b00020"}


def _yes_no(value: object) -> str:
    return {True: "yes", False: "NO", None: "?"}.get(value, str(value))  # type: ignore[call-overload]


def render_page(status: dict[str, Any]) -> str:
    """A self-contained HTML page (no external assets) for the admin port's ``/``."""
    e = html.escape
    v = status["verdict"]
    rows = "".join(
        f"<tr class='member' data-member='{e(r['member'])}' data-egress='{e(str(r['egress_ip']))}'>"
        f"<td>{e(r['member'])}</td><td>{e(str(r['egress_ip'] or 'unknown'))}</td>"
        f"<td class='up'>{_yes_no(r['up'])}</td><td class='stable'>{_yes_no(r['stable'])}</td>"
        f"<td class='allowlisted'>{_yes_no(r['allowlisted'])}</td></tr>"
        for r in status["pair"]
    )
    outcome_rows = "".join(
        f"<tr class='outcomes' data-egress='{e(ip)}'><td>{e(ip)}</td>"
        + "".join(f"<td>{e(k)}: {n}</td>" for k, n in sorted(counts.items()))
        + "</tr>"
        for ip, counts in sorted(status["outcomes_by_egress_ip"].items())
    )
    verdict_lines = "".join(f"<li>{e(line)}</li>" for line in v["lines"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>egress-sidecar status</title>
<meta http-equiv="refresh" content="10">
<style>
body{{font-family:system-ui,sans-serif;margin:2em;max-width:60em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:.3em .7em;text-align:left}}
.verdict{{border-left:.4em solid {_COLORS[v['level']]};padding:.5em 1em;background:#f6f6f6}}
</style></head><body>
<h1>egress-sidecar</h1>
<p>Mode: <b id="mode">{e(status['mode'])}</b> · guard: <b id="guard">{e(status['guard'])}</b> ·
route: {e(status['route'])} · ready: <b id="ready">{_yes_no(status['ready'])}</b> · version {e(status['version'])}</p>
<div class="verdict" id="verdict" data-level="{e(v['level'])}"><b>Verdict: {e(v['level'])}</b><ul>{verdict_lines}</ul></div>
<h2>Pair</h2>
<table id="pair"><tr><th>member</th><th>egress IP</th><th>up</th><th>stable</th><th>allowlisted</th></tr>{rows}</table>
<h2>Token call outcomes by egress IP (since start)</h2>
<table id="outcomes">{outcome_rows or '<tr><td>no token calls yet</td></tr>'}</table>
<p>Allowlist: <code id="allowlist">{e(status['allowlist'] or 'not configured')}</code></p>
<p><a href="/metrics">/metrics</a> · <a href="/status">/status</a> · <a href="/ca.pem">/ca.pem</a></p>
</body></html>
"""
