"""How long a refresh token lives unused, per customer org (``SIDECAR_IDLE_POLICY``), and the durations
the settings are written in. Pure code, no I/O.

Salesforce's default for a connected app or External Client App is "expire refresh token if not used for
30 days": a sliding window, restarted by every redemption. A customer org's admin can change it for the
app in that org (Edit Policies → Refresh Token Policy: valid until revoked, immediately, if not used for N
hours, days or months, or after N), so an ISV's one app may live under a different expiry in each org; an
app developer who limits the idle refresh token TTL caps it at 30 days sliding for every subscriber
(Salesforce Help, "Limit the Idle Refresh Token TTL in External Client Apps",
https://help.salesforce.com/s/articleView?id=xcloud.eca_limit_idle_refresh_token_ttl.htm). The policy
tells the sidecar which applies where, so idle warnings come when they matter (sliding expiries only:
"after N" counts from a grant's first issue, which the sidecar may not have seen):

``30d`` (the default), ``90d``, ``12h``, ``never``, then per org overrides:
``30d,00DXX0000001abcEAA=90d,00DYY0000002defEAA=never``. An org id is given as 15 or 18 characters (the
15-character form is converted). A grant whose org is not known yet follows the default.

A grant is *expiring* once it has been idle past its warning point, ``expiry - min(5 days, expiry / 6)``
(25 days of 30: when the sidecar has always warned), and *expired* past the expiry itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DAY = 86_400.0
UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY}
WARN_BEFORE = 5 * DAY  # at most this long before the expiry a grant is expiring
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_ORG_ID = re.compile(r"00D[A-Za-z0-9]{12}(?:[A-Za-z0-9]{3})?")
_CHECKSUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"


def parse_duration(text: str) -> float:
    """``400d``, ``12h``, ``30m``, ``90s`` (a number and its unit) in seconds; ``0`` alone is zero. Raises
    ValueError with a message that says what is accepted."""
    value = text.strip().lower()
    if value == "0":
        return 0.0
    found = _DURATION.fullmatch(value)
    if found is None:
        raise ValueError(f"{text.strip()!r} is not a duration: write a number and a unit, s, m, h or d (e.g. 400d, 12h)")
    return float(found.group(1)) * UNITS[found.group(2)]


def org_id_18(org: str) -> str:
    """A Salesforce record id in its 18-character form (the case-safe one token answers use): a
    15-character id gets its 3-character checksum, one letter per block of 5 whose bits mark the upper
    case letters. Raises ValueError for anything that is not an org id (``00D``...)."""
    org = org.strip()
    if not _ORG_ID.fullmatch(org):
        raise ValueError(f"{org!r} is not a Salesforce org id (00D followed by 12 or 15 letters and digits)")
    return org if len(org) == 18 else id_18(org)


def id_18(record_id: str) -> str:
    """A 15-character Salesforce record id with its case-safe checksum (18 characters)."""
    suffix = ""
    for block in range(3):
        bits = sum(1 << i for i, c in enumerate(record_id[block * 5:block * 5 + 5]) if "A" <= c <= "Z")
        suffix += _CHECKSUM[bits]
    return record_id[:15] + suffix


@dataclass(frozen=True)
class IdlePolicy:
    """The refresh token idle expiry per org, in seconds (None: valid until revoked)."""

    default: float | None = 30 * DAY
    orgs: dict[str, float | None] = field(default_factory=dict)  # 18-character org id -> expiry

    def expiry(self, org: str | None) -> float | None:
        return self.orgs.get(org, self.default) if org else self.default

    def warn_after(self, org: str | None) -> float | None:
        """Idle seconds after which a grant of ``org`` is expiring (None: never)."""
        expiry = self.expiry(org)
        return None if expiry is None else expiry - min(WARN_BEFORE, expiry / 6)

    def state(self, org: str | None, idle: float) -> str | None:
        """``expired``, ``expiring`` or None (neither) for a grant of ``org`` idle for ``idle`` seconds."""
        expiry = self.expiry(org)
        if expiry is None:
            return None
        if idle > expiry:
            return "expired"
        return "expiring" if idle > expiry - min(WARN_BEFORE, expiry / 6) else None

    def describe(self, org: str | None) -> str:
        return human_duration(self.expiry(org))


def parse_idle_policy(text: str) -> IdlePolicy:
    """``DEFAULT[,ORG=EXPIRY...]``, each expiry a duration (``30d``) or ``never``. Raises ValueError."""
    default: float | None = 30 * DAY
    orgs: dict[str, float | None] = {}
    items = [item.strip() for item in re.split(r"[,\s]+", text) if item.strip()]
    for i, item in enumerate(items):
        org, sep, value = item.partition("=")
        if not sep:
            if i != 0:
                raise ValueError(f"{item!r}: only the first item is the default expiry; write the others as ORG_ID=EXPIRY")
            default = _expiry(item)
            continue
        org18 = org_id_18(org)
        if org18 in orgs:
            raise ValueError(f"org {org18} is given twice")
        orgs[org18] = _expiry(value)
    return IdlePolicy(default, orgs)


def _expiry(text: str) -> float | None:
    if text.strip().lower() == "never":
        return None
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"{text.strip()!r}: an expiry must be longer than 0 (or never)")
    return seconds


def human_duration(seconds: float | None) -> str:
    """``30d``, ``12h``, ``never``: a duration as the policy writes it."""
    if seconds is None:
        return "never"
    for unit in ("d", "h", "m"):
        if seconds >= UNITS[unit] and seconds % UNITS[unit] == 0:
            return f"{int(seconds // UNITS[unit])}{unit}"
    return f"{seconds:g}s"
