"""``egress-sidecar audit``: the audit trail (:mod:`sidecar.state.audit`) exported for a security review.

It reads ``SIDECAR_CONFDIR/audit.sqlite3`` read-only, whether or not the sidecar is running, and writes
to standard output, streamed (a year of calls is never held in memory): every record as CSV with a header
row or as JSON lines, or a summary per org and egress IP (calls, counts by outcome, first and last seen).
The apps, orgs, users and token hosts the file keeps sealed are opened with the state's key
(``grants.key`` in the confdir, or the one derived from ``SIDECAR_REDIS_KEY``); a record written under
another key names them as unreadable. No token, secret or code is in the trail, so none can be in the
export.
"""

from __future__ import annotations

import csv
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from sidecar.metrics import OUTCOMES
from sidecar.state.audit import Names, fingerprint_of, names_of
from sidecar.state.expiry import org_id_18, parse_duration
from sidecar.state.sqlite import reader_key

UNREADABLE = "(sealed under another key)"
# The export's columns, in order: what each record says (docs/audit.md describes each).
EXPORT_COLUMNS = ("time", "app", "app_label", "org_id", "user_id", "grant", "grant_type", "token_host", "host_class",
                  "egress_ip", "egress_verified", "egress", "member", "route", "guard", "outcome", "status", "sf_error",
                  "retried", "retried_from", "coalesced", "replayed", "duration_ms")
SUMMARY_COLUMNS = ("org_id", "egress_ip", "calls", *OUTCOMES, "first_seen", "last_seen")
_SELECT = ("SELECT c.at, c.app, n.label, c.org, c.user, c.grant_id, c.grant_type, c.host, c.host_class, c.egress_ip, "
           "c.egress, c.member, c.route, c.guard, c.outcome, c.status, c.sf_error, c.retried_from, c.shield, "
           "c.duration_ms FROM calls AS c LEFT JOIN names AS n ON n.key = c.app")


@dataclass(frozen=True)
class Query:
    since: float | None = None
    until: float | None = None
    org: str | None = None  # an org id (15 or 18 characters)
    app: str | None = None  # a client_id, or its short label as the log shows it


def parse_when(text: str, now: float | None = None) -> float:
    """A point in time for ``--since``/``--until``: ISO 8601 (``2026-11-01``, ``2026-11-01T12:00:00Z``;
    without an offset, UTC) or a duration ago (``7d``, ``12h``). Raises ValueError."""
    value = text.strip()
    try:
        return (time.time() if now is None else now) - parse_duration(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is neither a time (2026-11-01, 2026-11-01T12:00:00Z) nor a duration ago "
                         "(7d, 12h)") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def _iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(at * 1000) % 1000:03d}Z"


class Reader:
    """One read of the trail: its filters, and the names it opened (each once)."""

    def __init__(self, db: sqlite3.Connection, keys: list[bytes]) -> None:
        self.db = db
        key = reader_key(fingerprint_of(db), keys)
        self.names = Names(key) if key is not None else None
        self.keyed = [Names(k) for k in keys]  # to find a name given in clear, under each key the reader has
        self._opened: dict[bytes, str | None] = {}

    def name(self, key: bytes | None) -> str | None:
        if key is None:
            return None
        if key not in self._opened:
            self._opened.update(names_of(self.db, self.names, [key]))
        value = self._opened[key]
        return UNREADABLE if value is None else value

    def where(self, q: Query) -> tuple[str, list[Any]]:
        """The SQL condition and its parameters for ``q`` (against ``calls AS c``)."""
        terms, params = ["1"], []
        if q.since is not None:
            terms.append("c.at >= ?")
            params.append(q.since)
        if q.until is not None:
            terms.append("c.at < ?")
            params.append(q.until)
        if q.org is not None:
            keys = [n.key("org", org_id_18(q.org)) for n in self.keyed]
            terms.append(f"c.org IN ({', '.join('?' * len(keys)) or 'NULL'})")
            params += keys
        if q.app is not None:
            keys = [n.key("app", q.app) for n in self.keyed]
            terms.append(f"(c.app IN ({', '.join('?' * len(keys)) or 'NULL'}) OR c.app IN "
                         "(SELECT key FROM names WHERE kind = 'app' AND label = ?))")
            params += [*keys, q.app]
        return " AND ".join(terms), params

    def records(self, q: Query) -> Iterator[dict[str, Any]]:
        """Every record ``q`` selects, oldest first, as the export's columns."""
        cond, params = self.where(q)
        for (at, app, label, org, user, grant, grant_type, host, host_class, egress_ip, egress, member, route, guard,
             outcome, status, sf_error, retried_from, shield, duration_ms) in self.db.execute(
                f"{_SELECT} WHERE {cond} ORDER BY c.at, c.id", params):
            yield {"time": _iso(at), "app": self.name(app), "app_label": label, "org_id": self.name(org),
                   "user_id": self.name(user), "grant": grant, "grant_type": grant_type, "token_host": self.name(host),
                   "host_class": host_class, "egress_ip": egress_ip, "egress_verified": egress == "verified",
                   "egress": egress, "member": member, "route": route, "guard": guard, "outcome": outcome,
                   "status": status, "sf_error": sf_error, "retried": retried_from is not None,
                   "retried_from": retried_from, "coalesced": shield == "coalesced", "replayed": shield == "replayed",
                   "duration_ms": duration_ms}

    def summary(self, q: Query) -> list[dict[str, Any]]:
        """Per org and egress IP: calls, counts by outcome, first and last seen (a retried call's refused first
        attempt counts as an ip_restricted call from the IP it left from)."""
        cond, params = self.where(q)
        rows: dict[tuple[bytes | None, str], dict[str, Any]] = {}
        query = (f"SELECT c.org, c.egress_ip, c.outcome, count(*), min(c.at), max(c.at) FROM calls AS c WHERE {cond} "
                 "GROUP BY c.org, c.egress_ip, c.outcome UNION ALL "
                 f"SELECT c.org, c.retried_from, 'ip_restricted', count(*), min(c.at), max(c.at) FROM calls AS c WHERE "
                 f"{cond} AND c.retried_from IS NOT NULL GROUP BY c.org, c.retried_from")
        for org, ip, outcome, n, first, last in self.db.execute(query, params + params):
            row = rows.setdefault((org, ip), {"org_id": self.name(org), "egress_ip": ip, "calls": 0,
                                              **dict.fromkeys(OUTCOMES, 0), "first_seen": first, "last_seen": last})
            row["calls"] += n
            row[outcome] = row.get(outcome, 0) + n
            row["first_seen"], row["last_seen"] = min(row["first_seen"], first), max(row["last_seen"], last)
        out = sorted(rows.values(), key=lambda r: (r["org_id"] or "", r["egress_ip"]))
        for r in out:
            r["first_seen"], r["last_seen"] = _iso(r["first_seen"]), _iso(r["last_seen"])
        return out


def write_rows(rows: Iterator[dict[str, Any]] | list[dict[str, Any]], columns: tuple[str, ...], fmt: str,
               out: TextIO) -> int:
    """CSV with a header row, or JSON lines; returns the rows written."""
    n = 0
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for r in rows:
            writer.writerow(["" if r.get(c) is None else str(r[c]).lower() if isinstance(r[c], bool) else r[c]
                             for c in columns])
            n += 1
        return n
    for r in rows:
        out.write(json.dumps({c: r.get(c) for c in columns}, separators=(",", ":")) + "\n")
        n += 1
    return n
