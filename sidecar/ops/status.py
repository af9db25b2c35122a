"""What the operator sees: the pair, each egress IP's allowlist and health state, and a verdict in
plain words. One function builds it; /status, the status page, ``check`` and the demo all use it.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from sidecar import __version__
from sidecar.egress.evidence import Finding, disagreements
from sidecar.egress.guard import Guard
from sidecar.egress.pair import Pair
from sidecar.egress.verify import Verifier
from sidecar.metrics import OUTCOMES


class StatusSource(Protocol):
    """What the status is built from (the running service provides it)."""

    pair: Pair
    guard: Guard
    verifier: Verifier
    started: float

    def is_ready(self) -> tuple[bool, str]: ...
    def status_facts(self) -> dict[str, Any]: ...
    def org_rows(self, page: int, findings: list[Finding]) -> dict[str, Any]: ...

Level = Literal["ok", "warning", "critical"]


@dataclass(frozen=True)
class Verdict:
    level: Level
    lines: list[str]

    @property
    def text(self) -> str:
        return " ".join(self.lines)


def member_rows(pair: Pair, guard: Guard, findings: list[Finding] | None = None,
                verifier: Verifier | None = None) -> list[dict[str, Any]]:
    """Each member with its egress IP's state: ``allowlisted`` is what SIDECAR_ALLOWLIST says (None: not set
    or IP unknown), ``salesforce`` what Salesforce's answers say (:func:`ip_says`), ``verification`` whether
    each new connection's egress IP is asked on it."""
    now = time.time()
    findings = _findings(guard) if findings is None else findings
    return [
        {
            **({"verification": verifier.describe(m)} if verifier is not None else {}),
            "member": m.label,
            "egress_ip": m.egress_ip,
            "observed_ips": m.observed_ips,
            "pinned": m.pinned_ip is not None,
            "stable": m.stable,
            "up": m.up,
            "ejected": m.ejected,
            "allowlisted": guard.is_allowlisted(m.egress_ip),
            "salesforce": ip_says(m.egress_ip, findings),
            "last_probe_age_seconds": None if m.last_probe is None else round(now - m.last_probe, 1),
            "last_error": m.last_error,
        }
        for m in pair.members
    ]


def ip_says(ip: str | None, findings: list[Finding]) -> dict[str, Any]:
    """What Salesforce's answers say about one egress IP: ``says`` is "refused" (for some app: refused by
    enough orgs, or by one and nobody redeemed through it since), "accepted" (some org redeemed through it)
    or "unknown"; ``orgs_refused`` the orgs whose own restriction refuses it while others redeem."""
    mine = [f for f in findings if ip is not None and f.egress_ip == ip]
    refused = [f for f in mine if f.kind == "refused" and f.scope != "org"]
    orgs = sorted({o for f in mine if f.kind == "refused" and f.scope == "org" for o in f.orgs})
    says = "refused" if refused else "accepted" if any(f.kind == "allowed" for f in mine) else "unknown"
    return {"says": says, "apps_refused": sorted({f.app for f in refused}), "orgs_refused": orgs}


def _findings(guard: Guard) -> list[Finding]:
    return guard.evidence.findings() if guard.evidence is not None else []


def verdict(pair: Pair, guard: Guard, findings: list[Finding] | None = None, *, strict: bool = False) -> Verdict:
    """The verdict in plain words. ``findings``: what Salesforce answered (by default the guard's evidence;
    ``check`` passes a running sidecar's). ``strict`` (``check``): without SIDECAR_ALLOWLIST, an egress IP
    Salesforce has not accepted a redemption through is not good enough."""
    if pair.direct:
        return Verdict(
            "warning",
            [
                "DIRECT MODE: QUOTAGUARDSTATIC_URL is not set, so token calls leave from this host's own IP "
                "and no static IP is in use."
            ],
        )
    findings = _findings(guard) if findings is None else findings
    lines: list[str] = []
    level: Level = "ok"
    critical: set[int] = set()  # the lines that made the verdict critical: said first
    judged = 0  # lines before this one have their level

    def worse(to: Level) -> None:
        """The lines said since the last call are of level ``to``."""
        nonlocal level, judged
        if to == "critical" or level == "ok":
            level = to
        if to == "critical":
            critical.update(range(judged, len(lines)))
        judged = len(lines)

    n = len(pair.members)
    allowlisted_up = [m for m in pair.members if m.up is not False and (guard.is_allowlisted(m.egress_ip) or (
        m.egress_ip is None and m.verifies and any(guard.is_allowlisted(ip) for ip in m.observed_ips)))]
    for m in pair.members:
        if m.up is False:
            lines.append(f"Pair member {m.label} is unreachable ({m.last_error or 'no answer'}).")
            worse("critical")
        elif m.stable is False and m.verifies:
            pass  # one load-balanced address: each connection's egress IP is judged (with_egress_checks says so)
        elif m.stable is False:
            lines.append(
                f"Pair member {m.label} is unstable: it left from {', '.join(m.observed_ips)}; "
                "its egress IP is not claimed. Allowlist every IP it uses."
            )
            worse("critical")
        elif m.egress_ip is None:
            lines.append(f"Egress IP of pair member {m.label} is not known yet (probe pending).")
            worse("warning")
    enforce = guard.mode == "enforce"
    refused = [f for f in findings if f.kind == "refused" and f.scope != "org"]
    own = [f for f in findings if f.kind == "refused" and f.scope == "org"]
    accepted = sorted({f.egress_ip for f in findings if f.kind == "allowed"} - {f.egress_ip for f in refused})
    for f in refused[:EVIDENCE_LINES]:
        listed = bool(guard.allowlist) and guard.allowlist.contains(f.egress_ip)
        lines.append(_refused_line(f, listed, enforce))
        worse("critical")
    if len(refused) > EVIDENCE_LINES:
        lines.append(f"... and {len(refused) - EVIDENCE_LINES} more refusals: see `evidence` in /status.")
        worse("critical")
    for f in own[:EVIDENCE_LINES]:
        lines.append(_org_line(f, enforce))
        worse("warning")
    if len(own) > EVIDENCE_LINES:
        lines.append(f"... and {len(own) - EVIDENCE_LINES} more customer-side refusals: see `evidence` in /status.")
        worse("warning")
    answered = set(accepted) | {f.egress_ip for f in refused}
    if not guard.allowlist:
        if guard.mode == "observe":
            lines.append(
                "No allowlist is configured (SIDECAR_ALLOWLIST) and the guard observes: set the allowlist, or let the "
                "guard enforce (the default with a pair), so that refreshes stay off refused egress IPs."
            )
            worse("warning")
        if strict:
            for ip in pair.egress_ips():
                if ip not in answered:
                    lines.append(
                        f"Egress IP {ip} is not confirmed: no SIDECAR_ALLOWLIST is set and Salesforce has not accepted a "
                        "redemption through it (none answered yet, or no running sidecar was asked). Add it to the "
                        "External Client App's Refresh Token IP Allowlist and set SIDECAR_ALLOWLIST to the same list."
                    )
                    worse("critical")
    else:
        for d in [d for d in disagreements(findings, guard.allowlist) if not d.listed][:EVIDENCE_LINES]:
            f = d.finding
            lines.append(
                f"Salesforce accepted a redemption through egress IP {f.egress_ip} for app {f.app} at "
                f"{when(f.at)}, but SIDECAR_ALLOWLIST does not list it: add it there (the guard follows Salesforce)."
            )
            worse("warning")
        for ip in guard.missing_ips():
            if ip in answered:
                continue  # Salesforce's answers said it already (the lines above)
            share = "about half of" if n == 2 else "some"
            if enforce:
                lines.append(
                    f"Egress IP {ip} is not on the allowlist: the guard keeps refresh token redemptions off it, "
                    "so you have no redundancy; add it in External Client App Manager."
                )
            else:
                lines.append(
                    f"Egress IP {ip} is not on the allowlist: {share} refresh token redemptions will fail; "
                    "add it in External Client App Manager."
                )
            worse("critical")
        if enforce and not allowlisted_up:
            lines.append("No pair member with an allowlisted egress IP is available: refresh calls are refused (503).")
            worse("critical")
    if not lines:
        ips = ", ".join(pair.egress_ips())
        if guard.allowlist:
            lines.append(f"All {n} pair members are up and every egress IP ({ips}) is on the allowlist.")
        else:
            confirmed = f"Salesforce accepted redemptions through {', '.join(accepted)}" if accepted else \
                "no redemption has been answered yet"
            lines.append(f"All {n} pair members are up ({ips or 'egress IPs not known yet'}); {confirmed}, and it "
                         "refused none. No SIDECAR_ALLOWLIST is set: the guard follows Salesforce's answers.")
    # What must be fixed first, then what is worth knowing (a FAIL of `check` starts with its reason).
    ordered = [line for i, line in enumerate(lines) if i in critical] + \
        [line for i, line in enumerate(lines) if i not in critical]
    return Verdict(level, ordered)


EVIDENCE_LINES = 5  # per kind; /status has them all
MAX_ORGS_NAMED = 5


def when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def _retest(f: Finding) -> str:
    if f.retest is None:
        return ""
    if f.retest <= time.time():
        return "its re-test goes with the next redemption"
    return f"re-tested from {when(f.retest)}"


def _orgs(orgs: tuple[str, ...]) -> str:
    named = ", ".join(orgs[:MAX_ORGS_NAMED])
    return named + (f" and {len(orgs) - MAX_ORGS_NAMED} more" if len(orgs) > MAX_ORGS_NAMED else "")


def _refused_line(f: Finding, listed: bool, enforce: bool) -> str:
    although = ", although SIDECAR_ALLOWLIST lists it" if listed else ""
    tail = ("Until then the guard keeps {} redemptions off it, so the pair has no redundancy for {}."
            if enforce else "Until then {} redemptions through that IP fail.")
    if f.scope == "app":
        return (f"Salesforce refused egress IP {f.egress_ip} for app {f.app}: {len(f.orgs)} orgs were refused through "
                f"it ({_orgs(f.orgs)}) and none has redeemed through it since (last at {when(f.at)}; {_retest(f)})"
                f"{although}: it is missing from that External Client App's Refresh Token IP Allowlist. Add "
                f"{f.egress_ip} there (External Client App Manager → Edit Settings). "
                + tail.format("that app's", "it"))
    return (f"Salesforce refused egress IP {f.egress_ip} for app {f.app} ({_orgs(f.orgs)}) at {when(f.at)} (ip "
            f"restricted), and no org has redeemed through it since ({_retest(f)}){although}: add {f.egress_ip} to that "
            "External Client App's Refresh Token IP Allowlist (External Client App Manager → Edit Settings); if it "
            "is there already, that org's own IP restrictions refuse it. "
            + tail.format("that org's", "that org"))


def _org_line(f: Finding, enforce: bool) -> str:
    who = f.orgs[0] if len(f.orgs) == 1 else f"{len(f.orgs)} orgs ({_orgs(f.orgs)})"
    return (f"Salesforce refused egress IP {f.egress_ip} for app {f.app}, {who} only (last at {when(f.at)}; "
            f"{_retest(f)}), while other orgs redeem through it: the app's allowlist admits it, and that org's own "
            "IP restrictions refuse it (a profile's Login IP Ranges, or the app's IP relaxation policy set to "
            f"Enforce in that org). The fix is on the customer's side: ask its admin to allow {f.egress_ip}. "
            + ("The guard sends that org's redemptions through the other egress IPs; the other orgs keep using it."
               if enforce else "Until then that org's redemptions through it fail."))


def evidence_rows(guard: Guard, findings: list[Finding] | None = None) -> list[dict[str, Any]]:
    """What Salesforce answered, for /status and the page: one row per app, egress IP and kind (refusals
    per scope), with when it was last said and when a refusal will be re-tested."""
    now = time.time()
    findings = _findings(guard) if findings is None else findings
    return [{**f.as_dict(), "at": when(f.at), "age_seconds": round(now - f.at, 1),
             "retest_at": None if f.retest is None else when(f.retest),
             "allowlist_says": None if not guard.allowlist else guard.allowlist.contains(f.egress_ip)}
            for f in findings]


TLS_RECENT_SECONDS = 600.0  # client TLS failures this recent make the verdict say so


def with_client_tls(v: Verdict, tls: dict[str, Any]) -> Verdict:
    """The verdict, with a line when clients failed the TLS handshake lately (an app that does not
    trust the sidecar's CA fails every token call before the sidecar sees it)."""
    failures, age = tls.get("failures") or {}, tls.get("last_age_seconds")
    if not sum(failures.values()) or age is None or age > TLS_RECENT_SECONDS:
        return v
    counts = ", ".join(f"{reason.replace('_', ' ')}: {n}" for reason, n in sorted(failures.items()) if n)
    line = (f"{sum(failures.values())} client TLS handshakes with the sidecar failed since start ({counts}; the last "
            f"{age:.0f} s ago). An app that does not trust the sidecar's CA cannot make token calls: point its CA "
            "setting at ca-bundle.pem (docs/clients.md).")
    return Verdict("critical" if v.level == "critical" else "warning", [*v.lines, line])


def with_egress_checks(v: Verdict, pair: Pair, verifier: Verifier | None) -> Verdict:
    """The verdict, with what per-connection egress verification found: the layout when it is one
    load-balanced address, and a warning for each member whose connections go unverified."""
    if verifier is None or pair.direct:
        return v
    lines, level = list(v.lines), v.level
    for m in pair.members:
        seen = verifier.describe(m)
        if seen["mode"] == "unverified" and m.up is not False:
            lines.append(f"The egress IP of connections through pair member {m.label} is unverified: {seen['reason']}. "
                         "Token calls still go through it (with the retry of a refusal behind them); allowlist every "
                         f"IP it showed ({', '.join(m.observed_ips) or 'none yet'}).")
            level = "critical" if level == "critical" else "warning"
        elif m.stable is False and m.up is not False:
            lines.append(f"Pair member {m.label} is one load-balanced address that leaves from "
                         f"{', '.join(m.observed_ips)}: the egress IP of each connection is verified on it, and the "
                         "guard judges that IP.")
    return Verdict(level, lines)


def with_shared_state(v: Verdict, redis: dict[str, Any]) -> Verdict:
    """The verdict, with a line while the Redis the replicas share cannot be reached."""
    if not redis.get("configured") or redis.get("up") is not False:
        return v
    line = (f"Redis (SIDECAR_REDIS_URL) is unreachable since {redis.get('down_since')}: refresh token redemptions "
            "wait for it (a restart is ridden out), then go from each replica alone: a token redeemed by two replicas "
            "at once is not coalesced until Redis is back. Token calls keep working. Bring Redis back.")
    return Verdict("critical" if v.level == "critical" else "warning", [*v.lines, line])


def build_status(sidecar: StatusSource, orgs_page: int = 1) -> dict[str, Any]:
    """The status; ``orgs_page`` is the page of the per-org table it carries (1-based)."""
    ready, why = sidecar.is_ready()
    facts = sidecar.status_facts()
    findings = _findings(sidecar.guard)
    v = with_shared_state(with_client_tls(with_egress_checks(verdict(sidecar.pair, sidecar.guard, findings),
                                                             sidecar.pair, sidecar.verifier), facts["client_tls"]),
                          facts["shield"]["redis"])
    return {
        "version": __version__,
        "mode": "direct" if sidecar.pair.direct else "pair",
        "ready": ready,
        "ready_reason": why,
        "uptime_seconds": round(time.time() - sidecar.started, 1),
        "upstream": facts["upstream"],
        "route": facts["route"],
        "guard": sidecar.guard.mode,
        "allowlist": str(sidecar.guard.allowlist) if sidecar.guard.allowlist else None,
        "missing_from_allowlist": sidecar.guard.missing_ips(),
        "pair": member_rows(sidecar.pair, sidecar.guard, findings, sidecar.verifier),
        "layout": sidecar.verifier.layout() if not sidecar.pair.direct else None,
        "probe_rounds": facts["probe_rounds"],
        "client_tls": facts["client_tls"],
        "shield": facts["shield"],
        "evidence": evidence_rows(sidecar.guard, findings),
        "orgs": sidecar.org_rows(orgs_page, findings),
        "verdict": {"level": v.level, "lines": v.lines},
        **facts["calls"],
    }


_COLORS = {"ok": "#1b7f3a", "warning": "#a86500", "critical": "#b00020"}
_TINTS = {"ok": "#eaf6ee", "warning": "#fff4e0", "critical": "#fdecee"}
_HEADLINES = {
    "ok": "OK: every egress IP is allowlisted and up",
    "warning": "Warning: check the pair",
    "critical": "Critical: action needed",
}
_FAILED = frozenset(OUTCOMES) - {"success"}
_RECENT_ROWS = 10


def _yes_no(value: object) -> str:
    return {True: "yes", False: "NO", None: "?"}.get(value, str(value))  # type: ignore[call-overload]


def _state_cell(column: str, value: object) -> str:
    """A yes/NO/? cell; NO is styled so it stands out in the table."""
    kind = "bad" if value is False else "good" if value is True else "unknown"
    return f"<td class='{column} {kind}'>{_yes_no(value)}</td>"


def _says_cell(says: dict[str, Any] | None) -> str:
    """What Salesforce said about an egress IP: yes, refused (for the app), refused for some orgs only (their
    own restriction), or unknown (nothing answered yet)."""
    says = says or {}
    word = {"accepted": "yes", "refused": "refused", "unknown": "unknown"}.get(says.get("says"), "unknown")
    kind = {"yes": "good", "refused": "bad"}.get(word, "unknown")
    orgs = says.get("orgs_refused") or []
    if orgs:
        word += f"; refused for {', '.join(orgs[:3])}{' and more' if len(orgs) > 3 else ''} only (customer side)"
        kind = "bad" if kind == "bad" else "partial"
    return f"<td class='salesforce {kind}'>{html.escape(word)}</td>"


def _listed_cell(listed: object, configured: bool) -> str:
    """What SIDECAR_ALLOWLIST says about an egress IP."""
    word = "listed" if listed is True else "NOT listed" if listed is False else "not set" if not configured else "?"
    kind = "good" if listed is True else "bad" if listed is False else "unknown"
    return f"<td class='allowlisted {kind}'>{word}</td>"


def _age(seconds: object) -> str:
    return "never" if seconds is None else f"{seconds:.0f} s ago" if isinstance(seconds, int | float) else "?"


def _outcome_columns(by_ip: dict[str, dict[str, int]]) -> list[str]:
    """success and ip_restricted always (the classic split), then any other outcome seen, in metric order."""
    seen = {k for counts in by_ip.values() for k in counts}
    order = list(OUTCOMES) + sorted(seen - set(OUTCOMES))
    return [k for k in order if k in ("success", "ip_restricted") or k in seen]


def _egress_label(ip: str) -> str:
    return {"none": "none (blocked, not sent)", "unknown": "unknown (not probed yet)"}.get(ip, ip)


def render_page(status: dict[str, Any]) -> str:
    """A self-contained HTML page (no script, no external assets) for the admin port's ``/``.

    Read top to bottom: the verdict (what to do), the pair (which IP is not allowlisted or down), the
    outcome counts per egress IP since start (the ~50/50 split of the classic failure), recent calls.
    """
    e = html.escape
    v = status["verdict"]
    configured = bool(status.get("allowlist"))
    says_by_ip = {r["egress_ip"]: r.get("salesforce") for r in status["pair"] if r["egress_ip"]}

    def flagged(r: dict[str, Any]) -> bool:
        return r["allowlisted"] is False or r["up"] is False or (r.get("salesforce") or {}).get("says") == "refused"

    rows = "".join(
        f"<tr class='member{' flagged' if flagged(r) else ''}'"
        f" data-member='{e(r['member'])}' data-egress='{e(r['egress_ip'] or 'unknown')}'>"
        f"<td>{e(r['member'])}</td><td class='ip'>{e(str(r['egress_ip'] or 'unknown'))}</td>"
        + _says_cell(r.get("salesforce"))
        + _listed_cell(r["allowlisted"], configured)
        + _state_cell("up", r["up"])
        + _state_cell("stable", r["stable"])
        + f"<td class='probe'>{e(_age(r.get('last_probe_age_seconds')))}</td>"
        f"<td class='error'>{e(r.get('last_error') or '')}</td></tr>"
        for r in status["pair"]
    )
    by_ip: dict[str, dict[str, int]] = status["outcomes_by_egress_ip"]
    columns = _outcome_columns(by_ip)
    outcome_head = (
        "<tr><th>egress IP</th><th>Salesforce says</th><th>calls</th><th>failed</th>"
        + "".join(f"<th>{e(k)}</th>" for k in columns)
        + "</tr>"
    )

    def outcome_row(ip: str, counts: dict[str, int]) -> str:
        total = sum(counts.values())
        failed = sum(n for k, n in counts.items() if k in _FAILED)
        share = f"{100 * failed / total:.0f} %" if total else "-"
        cells = "".join(
            f"<td class='n{' bad' if k in _FAILED and counts.get(k) else ''}{' zero' if not counts.get(k) else ''}'"
            f" data-outcome='{e(k)}'>{counts.get(k, 0)}</td>"
            for k in columns
        )
        return (
            f"<tr class='outcomes{' flagged' if failed else ''}' data-egress='{e(ip)}'>"
            f"<td class='ip'>{e(_egress_label(ip))}</td>"
            + (_says_cell(says_by_ip[ip]) if ip in says_by_ip else "<td class='salesforce'>-</td>")
            + f"<td class='n total'>{total}</td><td class='n share{' bad' if failed else ''}'>{share}</td>{cells}</tr>"
        )

    outcome_rows = "".join(outcome_row(ip, counts) for ip, counts in sorted(by_ip.items()))
    restricted = sorted(ip for ip, counts in by_ip.items() if counts.get("ip_restricted"))
    hint = (
        f"<p class='hint' id='outcomes-hint'>{e(', '.join(restricted))} failed with ip_restricted: Salesforce refused "
        "the egress IP. One IP failing while the other succeeds means it is missing from the External Client "
        "App's Refresh Token IP Allowlist.</p>"
        if restricted
        else ""
    )
    evidence_rows_html = "".join(
        f"<tr class='evidence{' flagged' if r['evidence'] == 'refused' else ''}' data-egress='{e(r['egress_ip'])}'"
        f" data-scope='{e(str(r.get('scope') or ''))}'>"
        f"<td>{e(r['app'])}</td><td class='ip'>{e(r['egress_ip'])}</td>"
        f"<td class='{'bad' if r['evidence'] == 'refused' else 'good'}'>{e(_answer(r))}</td>"
        f"<td class='orgs'>{e(', '.join(r.get('orgs') or []))}</td>"
        f"<td>{e(r['at'])}</td><td>{e(r.get('retest_at') or '-')}</td>"
        f"<td>{e(_listed(r.get('allowlist_says')))}</td></tr>"
        for r in status.get("evidence") or []
    )
    sh = status.get("shield") or {}
    redis = sh.get("redis") or {}
    shield_line = e(f"{sh.get('coalesced', 0)} redemptions coalesced with an identical one in flight, "
                    f"{sh.get('replayed', 0)} answered again within the {sh.get('replay_window_seconds', 0):g} s "
                    "replay window; " + ("state shared on Redis (" + ("up" if redis.get("up") else "UNREACHABLE")
                                         + ")" if redis.get("configured") else "state kept in this process") + ".")
    recent = list(reversed(status.get("recent") or []))[:_RECENT_ROWS]
    recent_rows = "".join(
        f"<tr class='call'><td class='time'>{e(_clock(c.get('at')))}</td>"
        f"<td>{e(str(c.get('grant_type')))}</td><td>{e(str(c.get('member')))}</td>"
        f"<td class='ip'>{e(str(c.get('egress_ip')))}</td>"
        f"<td class='{'good' if c.get('outcome') == 'success' else 'bad'}'>{e(str(c.get('outcome')))}</td>"
        f"<td class='n'>{e(str(c.get('status') if c.get('status') is not None else '-'))}</td>"
        f"<td class='n'>{e(str(c.get('duration_ms') if c.get('duration_ms') is not None else '-'))}</td></tr>"
        for c in recent
    )
    verdict_lines = "".join(f"<li>{e(line)}</li>" for line in v["lines"])
    orgs_html = _orgs_section(status.get("orgs"))
    color, tint = _COLORS[v["level"]], _TINTS[v["level"]]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>egress-sidecar: {e(v['level'])}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<meta http-equiv="refresh" content="10">
<style>
body{{font-family:system-ui,sans-serif;margin:1.5em 2em;max-width:68em;color:#222;line-height:1.4}}
h1{{margin:0 0 .2em;font-size:1.6em}}h2{{font-size:1.15em;margin:1.4em 0 .3em}}
.meta{{color:#555;margin:0 0 1em}}.meta b{{color:#222}}
table{{border-collapse:collapse;margin:.4em 0}}
td,th{{border:1px solid #ccc;padding:.35em .8em;text-align:left}}th{{background:#f2f2f2;font-weight:600}}
td.n{{text-align:right;font-variant-numeric:tabular-nums}}td.ip{{font-family:ui-monospace,monospace}}
td.good{{color:#1b7f3a}}td.bad{{color:#b00020;font-weight:700;background:#fdecee}}
td.unknown,td.partial{{color:#a86500}}td.zero{{color:#999}}td.error{{color:#b00020}}
tr.flagged td:first-child{{box-shadow:inset .3em 0 0 #b00020}}
.verdict{{border:1px solid {color};border-left:.5em solid {color};background:{tint};padding:.6em 1.2em;border-radius:.2em}}
.verdict h2{{margin:.1em 0 .2em;color:{color};font-size:1.3em}}.verdict ul{{margin:.2em 0;padding-left:1.2em}}
.verdict li{{font-size:1.1em;margin:.25em 0}}
.hint{{color:#555;font-size:.9em;margin:.2em 0}}
code{{background:#f2f2f2;padding:.1em .3em}}
</style></head><body>
<h1>egress-sidecar</h1>
<p class="meta">Mode: <b id="mode">{e(status['mode'])}</b> · guard: <b id="guard">{e(status['guard'])}</b> ·
route: <b>{e(status['route'])}</b> · ready: <b id="ready">{_yes_no(status['ready'])}</b> ·
up {e(_uptime(status.get('uptime_seconds')))} · version {e(status['version'])}</p>
<div class="verdict" id="verdict" data-level="{e(v['level'])}"><h2>{e(_HEADLINES[v['level']])}</h2>
<ul>{verdict_lines}</ul></div>
<h2>Pair</h2>
<table id="pair"><tr><th>member</th><th>egress IP</th><th>Salesforce says</th><th>SIDECAR_ALLOWLIST</th><th>up</th>
<th>stable</th><th>last probe</th><th>last error</th></tr>{rows}</table>
<h2>Token call outcomes by egress IP (since start)</h2>
<table id="outcomes">{outcome_head + outcome_rows if outcome_rows else '<tr><td>no token calls yet</td></tr>'}</table>
{hint}
<h2>What Salesforce answered, per app, org and egress IP</h2>
<table id="evidence">{'<tr><th>app (client_id)</th><th>egress IP</th><th>answer</th><th>orgs</th><th>last seen</th><th>re-test from</th><th>SIDECAR_ALLOWLIST</th></tr>' + evidence_rows_html if evidence_rows_html else '<tr><td>no redemption answered yet</td></tr>'}</table>
<p id="shield">Rotation shield: {shield_line}</p>
{orgs_html}
<h2>Recent token calls (newest first)</h2>
<table id="recent">{'<tr><th>time (UTC)</th><th>grant type</th><th>member</th><th>egress IP</th><th>outcome</th><th>status</th><th>ms</th></tr>' + recent_rows if recent_rows else '<tr><td>none yet</td></tr>'}</table>
<p>Allowlist: <code id="allowlist">{e(status['allowlist'] or 'not configured')}</code></p>
<p><a href="/metrics">/metrics</a> · <a href="/status">/status</a> · <a href="/ca.pem">/ca.pem</a> · refreshes every 10 s</p>
</body></html>
"""


def _orgs_section(orgs: dict[str, Any] | None) -> str:
    """The per-org table (one page of it) with its pager: bounded whatever the number of orgs."""
    e = html.escape
    orgs = orgs or {"total": 0, "rows": [], "page": 1, "pages": 1, "per_page": 0, "attention": 0}
    rows = orgs.get("rows") or []

    def ips(r: dict[str, Any]) -> str:
        return "; ".join(f"{ip}: " + ", ".join(f"{n} {k}" for k, n in sorted(c.items(), key=lambda kv: -kv[1]))
                         for ip, c in (r.get("egress_ips") or {}).items()) or "-"

    def grants(r: dict[str, Any]) -> str:
        extra = [f"{r[k]} {w}" for k, w in (("grants_expiring", "expiring"), ("grants_expired", "expired")) if r.get(k)]
        return f"{r.get('grants', 0)}" + (f" ({', '.join(extra)})" if extra else "")

    body = "".join(
        f"<tr class='org{' flagged' if r.get('attention') else ''}' data-org='{e(r['org'])}'>"
        f"<td class='orgid'>{e(r['org'])}</td><td>{e(', '.join(r.get('apps') or []) or '-')}</td>"
        f"<td class='ips'>{e(ips(r))}</td>"
        f"<td class='n refusals{' bad' if r.get('refusals') else ''}'>{r.get('refusals', 0)}</td>"
        f"<td class='refused{' bad' if r.get('refused_ips') else ''}'>{e(', '.join(r.get('refused_ips') or []) or '-')}</td>"
        f"<td class='grants{' bad' if r.get('idle_warning') else ''}'>{e(grants(r))}</td>"
        f"<td>{e(str(r.get('expiry') or '-'))}</td><td class='last'>{e(r.get('last_redemption') or 'not since start')}</td>"
        f"<td class='warning'>{e(r.get('idle_warning') or '')}</td></tr>"
        for r in rows
    )
    page, pages, per_page, total = orgs.get("page", 1), orgs.get("pages", 1), orgs.get("per_page", 0), orgs.get("total", 0)
    first = (page - 1) * per_page + 1 if rows else 0
    links = []
    if page > 1:
        links.append(f"<a rel='prev' href='/?orgs_page={page - 1}'>&larr; previous</a>")
    if page < pages:
        links.append(f"<a rel='next' href='/?orgs_page={page + 1}'>next &rarr;</a>")
    pager = (f"<p id='orgs-pager' data-page='{page}' data-pages='{pages}' data-total='{total}'>Orgs {first}&ndash;"
             f"{first + len(rows) - 1 if rows else 0} of {total} (page {page} of {pages}; {orgs.get('attention', 0)} need "
             f"attention, listed first)" + (" · " + " · ".join(links) if links else "") + "</p>")
    head = ("<tr><th>org</th><th>apps</th><th>egress IPs (calls since start)</th><th>refusals</th><th>refused IPs</th>"
            "<th>grants</th><th>expiry</th><th>last redemption</th><th>warning</th></tr>")
    unnamed = orgs.get("grants_without_org") or 0
    note = (f"<p class='hint'>{unnamed} tracked grant(s) belong to an org no answer has named yet.</p>" if unnamed else "")
    return (f"<h2>Customer orgs</h2>\n{pager}\n<table id='orgs'>"
            f"{head + body if body else '<tr><td>no customer org seen yet</td></tr>'}</table>\n{note}"
            "<p class='hint'>The full history, per org and egress IP: <code>egress-sidecar audit --summary</code>.</p>")


def _answer(row: dict[str, Any]) -> str:
    if row["evidence"] != "refused":
        return "allowed"
    return {"app": "refused for the app", "org": "refused for these orgs only (customer side)",
            "unproven": "refused (app or org: not proven)"}.get(str(row.get("scope")), "refused")


def _clock(at: object) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(at)) if isinstance(at, int | float) else "-"


def _listed(value: object) -> str:
    return {True: "lists it", False: "does not list it", None: "not set"}.get(value, "?")  # type: ignore[call-overload]


def _uptime(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    s = int(seconds)
    return f"{s // 86400}d {s % 86400 // 3600}h" if s >= 86400 else f"{s // 3600}h {s % 3600 // 60}m" if s >= 3600 \
        else f"{s // 60}m {s % 60}s" if s >= 60 else f"{s}s"
