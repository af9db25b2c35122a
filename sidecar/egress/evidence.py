"""What Salesforce answered through each egress IP, per app and customer org: the evidence the guard and the
verdict follow.

A typed copy of the Refresh Token IP Allowlist (``SIDECAR_ALLOWLIST``) is a hint; Salesforce's answers
are the truth, read with care. An ISV's one External Client App (the ``client_id`` Salesforce sees)
carries the refreshes of many customer orgs, and an "ip restricted" refusal does not say whose rule
refused it: the app's allowlist, or the org's own restrictions (a profile's Login IP Ranges, the app's
IP relaxation policy set to Enforce in that org). Salesforce does not document the allowlist's wording,
and public code shows "ip restricted" texts for the customer-side restrictions (REFERENCE.md). So:

- a successful redemption (``refresh_token``, ``authorization_code``) through egress IP X, by any org,
  proves that the app's allowlist admits X;
- an "ip restricted" refusal through X is kept for the org whose grant was refused (a grant whose org
  is not known yet, from the ``id`` of an answer, is its own key until it is), and keeps that org's
  redemptions off X (and those of grants whose org is not known yet, while nothing proves the refusal
  that org's own);
- X is refused for the whole app only when refusals come from at least ``app_orgs`` (2) orgs and no
  org has redeemed through X since (scope ``app``). One org refused where another succeeds is that
  org's own restriction (scope ``org``): the fix is on the customer's side and X stays in use for
  everyone else. One org refused and no success through X yet cannot be told apart (``unproven``).
- a refusal lasts until a success through X disproves it. ``SIDECAR_EVIDENCE_TTL`` only schedules a
  re-test: from ``retest`` on, one real redemption may go through X (the guard sends a refused one again
  through another IP), and a refusal pushes the next re-test another TTL away. A refusal that is not
  seen again for ``FORGET_AFTER`` (the IP left the pair, the org stopped redeeming) is forgotten.

Apps and orgs are keyed hashes; people see an app's ``client_id`` shortened (``3MVG9d…_Xq``) and an org's
id (a Salesforce record id, not a secret: the operator must name it to the customer), in logs and on
``/status``, never in metric labels. Facts live in memory (bounded), in ``grants.sqlite3`` so a restart
keeps them (org ids sealed), and with ``SIDECAR_REDIS_URL`` in Redis (sealed), read before each call of
the app is routed, so a refusal one replica met steers every replica.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from sidecar.egress.allowlist import Allowlist
from sidecar.logs import event
from sidecar.metrics import Metrics
from sidecar.state.seal import Sealer
from sidecar.state.sqlite import Change, EvidenceRow, GrantStore
from sidecar.token.call import Identity

if TYPE_CHECKING:
    from sidecar.state.redis import SharedState

log = logging.getLogger("egress_sidecar.evidence")

Kind = Literal["allowed", "refused"]
Scope = Literal["app", "unproven", "org"]
MAX_FACTS = 10_000  # refusals kept, and (app, egress IP) successes kept; the least recently updated go first
STORE_EVERY = 60.0  # seconds between writes of an unchanged answer
FORGET_AFTER = 30 * 86400.0  # a refusal not seen again (nor re-tested) for this long is forgotten
PENDING = 2.0  # seconds during which this replica's own change wins over what Redis says (its write may lag)
MAX_CACHED_ID = 256  # longer client_ids are hashed each time, never kept
MAX_APPS_CACHED = 1024  # client_id -> App hashes kept (cleared when full: a flood of made-up ids costs only CPU)
MAX_ORGS_CACHED = 10_000  # org id -> Org hashes kept (cleared when full)
_APP_CONTEXT = b"egress-sidecar app"
_ORG_CONTEXT = b"egress-sidecar org"
ANY = b""  # the subject of the app's successes (any org)


def short_client_id(client_id: str) -> str:
    """A client_id for people: enough to tell apps apart, not the whole consumer key."""
    return client_id if len(client_id) <= 12 else f"{client_id[:6]}…{client_id[-4:]}"


@dataclass(frozen=True, slots=True)
class App:
    key: bytes  # HMAC of the client_id under the install key
    label: str  # short_client_id


@dataclass(frozen=True, slots=True)
class Org:
    """A customer org, or, while no answer has named its org, a grant standing for it (its own key)."""

    key: bytes  # HMAC of the org id under the install key; while the org is not known, the grant's key
    id: str | None = None  # the org id (00D...), once an answer named it
    user: str | None = None  # the user (005...) of the grant the call redeems, when known

    @property
    def known(self) -> bool:
        return self.id is not None

    @property
    def label(self) -> str:
        if self.id is not None:
            return f"org {self.id}"
        return f"grant {self.key.hex()[:12]}" if any(self.key) else "a call without a grant"

    def same(self, other: Org | None) -> bool:
        return other is not None and other.key == self.key


NOBODY = Org(bytes(16))  # the subject of a call that carries no grant (it cannot be told apart from others)


@dataclass(slots=True)
class Refusal:
    """One org's latest "ip restricted" answer through one egress IP for one app."""

    app: App
    org: Org
    egress_ip: str
    at: float  # the latest refusal
    retest: float  # from then on one redemption may test the IP again
    stored: float = 0.0  # when last written to grants.sqlite3
    touched: float = 0.0  # monotonic: when this replica last changed it (a Redis read does not undo it)


@dataclass(slots=True)
class Accepted:
    """The app's latest successes through one egress IP: the latest, and the latest of another org."""

    app: App
    egress_ip: str
    at: float
    org: Org | None
    other_at: float | None = None
    other: Org | None = None
    stored: float = 0.0
    touched: float = 0.0

    def by_other_than(self, org: Org) -> bool:
        """Has an org other than ``org`` redeemed through the IP?"""
        return (self.org is not None and not org.same(self.org)) or (self.other is not None and not org.same(self.other))

    def add(self, org: Org | None, at: float) -> None:
        if self.org is not None and org is not None and not org.same(self.org):
            self.other, self.other_at = self.org, self.at
        self.org, self.at = org or self.org, max(at, self.at)


@dataclass(frozen=True, slots=True)
class Said:
    """What the evidence says about one egress IP for one org's redemption."""

    kind: Kind
    scope: Scope | None = None  # for a refusal
    due: bool = False  # a refusal whose re-test may go now


@dataclass(frozen=True, slots=True)
class Finding:
    """What people see: for one app and egress IP, a success, or refusals of one scope."""

    app: str  # the app's label
    egress_ip: str
    kind: Kind
    scope: Scope | None  # refusals: app (enough orgs, none succeeded since), unproven, org (that org's own)
    orgs: tuple[str, ...]  # refusals: the orgs refused; a success: the org that last redeemed through it
    at: float  # when Salesforce last said it
    retest: float | None = None  # refusals: from when the next re-test may go

    def as_dict(self) -> dict[str, Any]:
        return {"app": self.app, "egress_ip": self.egress_ip, "evidence": self.kind, "scope": self.scope,
                "orgs": list(self.orgs), "last_seen": self.at, "retest": self.retest}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding | None:
        """A finding read back from /status (``egress-sidecar check``); None for anything malformed."""
        try:
            kind, scope = d["evidence"], d.get("scope")
            if kind not in ("allowed", "refused") or scope not in (None, "app", "unproven", "org"):
                return None
            retest = d.get("retest")
            return cls(str(d["app"]), str(d["egress_ip"]), kind, scope, tuple(str(o) for o in d.get("orgs") or ()),
                       float(d["last_seen"]), None if retest is None else float(retest))
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True, slots=True)
class Disagreement:
    """SIDECAR_ALLOWLIST says one thing about an egress IP, Salesforce's answers another."""

    finding: Finding
    listed: bool  # whether SIDECAR_ALLOWLIST lists the IP


def disagreements(findings: Iterable[Finding], allowlist: Allowlist) -> list[Disagreement]:
    """Where SIDECAR_ALLOWLIST and Salesforce disagree: a listed IP refused for the app (not only for an org,
    whose own restriction the allowlist cannot know), an unlisted IP some org redeemed through."""
    if not allowlist:
        return []
    out = []
    for f in findings:
        listed = allowlist.contains(f.egress_ip)
        if (listed and f.kind == "refused" and f.scope != "org") or (not listed and f.kind == "allowed"):
            out.append(Disagreement(f, listed))
    return out


class Evidence:
    """Thread-safe (the admin server reads it). Records nothing until :meth:`open` gives it the key."""

    def __init__(self, metrics: Metrics, ttl: float, allowlist: Allowlist, *, app_orgs: int = 2,
                 clock: Callable[[], float] = time.time, max_facts: int = MAX_FACTS,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.ttl = ttl
        self.app_orgs = max(1, app_orgs)
        self.allowlist = allowlist  # SIDECAR_ALLOWLIST, for the disagreements
        self.clock = clock
        self.monotonic = monotonic
        self.max_facts = max_facts
        self.store: GrantStore | None = None
        self.shared: SharedState | None = None
        self._key: bytes | None = None
        self._sealer: Sealer | None = None
        self._lock = threading.RLock()
        self._refusals: dict[tuple[bytes, str], dict[bytes, Refusal]] = {}  # (app, IP) -> org key -> refusal
        self._count = 0  # refusals held
        self._accepted: dict[tuple[bytes, str], Accepted] = {}  # (app, IP) -> its latest successes
        self._claims: dict[tuple[bytes, str], float] = {}  # (app, IP) -> next app-wide re-test (pushed by claims)
        self._tombstones: dict[tuple[bytes, str, bytes], float] = {}  # refusals this replica just removed
        self._apps: dict[str, App] = {}  # client_id -> App, for this key
        self._labels: dict[bytes, str] = {}  # app key -> label (apps known only from the store or Redis)
        self._orgs: dict[str, bytes] = {}  # org id -> its keyed hash
        self._gauged: set[str] = set()
        self._pulls: dict[bytes, asyncio.Future[None]] = {}
        self._evicted: list[Any] = []  # file rows to drop, of facts the bounds forgot

    # -- names ----------------------------------------------------------------------------------
    def open(self, key: bytes, store: GrantStore | None = None) -> None:
        """Take the install key and the facts kept in ``store`` (those a restart must not forget)."""
        self._key = key
        self._sealer = Sealer(key, b"evidence")
        self._apps.clear()
        self._orgs.clear()
        self.store = store
        if store is not None:
            rows = store.load_evidence(2 * self.max_facts)
            with self._lock:
                for row in rows:
                    self._load_row(row)
        self.update_metrics()

    def app(self, client_id: str | None) -> App | None:
        if self._key is None or not client_id:
            return None
        app = self._apps.get(client_id)  # an install has a few apps: hashed once each, not per call
        if app is None:
            digest = hmac.digest(self._key, _APP_CONTEXT + client_id.encode("utf-8"), "sha256")[:16]
            app = App(digest, short_client_id(client_id))
            if len(client_id) <= MAX_CACHED_ID:  # (a consumer key is ~85 characters; a made-up 64 KiB one is not kept)
                if len(self._apps) >= MAX_APPS_CACHED:
                    self._apps.clear()
                self._apps[client_id] = app
        return app

    def org(self, identity: Identity) -> Org:
        """The org an answer named (its id hashed under the install key, so replicas agree on it)."""
        key = self._orgs.get(identity.org)
        if key is None:
            if self._key is None:  # not opened: it records nothing anyway
                return Org(bytes(16), identity.org, identity.user or None)
            key = hmac.digest(self._key, _ORG_CONTEXT + identity.org.encode("utf-8"), "sha256")[:16]
            if len(self._orgs) >= MAX_ORGS_CACHED:
                self._orgs.clear()
            self._orgs[identity.org] = key
        return Org(key, identity.org, identity.user or None)

    @staticmethod
    def grant(key: bytes) -> Org:
        """A grant whose org is not known yet: its own key (the grant tracker's hash of its first token)."""
        return Org(key)

    # -- learning -------------------------------------------------------------------------------
    def record(self, app: App | None, org: Org | None, egress_ip: str | None, kind: Kind) -> bool:
        """What Salesforce answered for ``org``'s redemption for ``app`` through ``egress_ip``. True when it
        is news (a first refusal, or a success that disproved one): say it with :meth:`announce`."""
        if app is None or not egress_ip or self._key is None:
            return False
        org = org or NOBODY
        now, mono = self.clock(), self.monotonic()
        with self._lock:
            self._labels.setdefault(app.key, app.label)
            if kind == "refused":
                news, rows, fields = self._refused(app, org, egress_ip, now, mono)
            else:
                news, rows, fields = self._allowed(app, org, egress_ip, now, mono)
            rows += self._take_evicted()
        self._write(app, rows, fields)
        if news:
            self.update_metrics()
        return news

    def _refused(self, app: App, org: Org, ip: str, now: float, mono: float) -> tuple[bool, list[Any], list[Any]]:
        subs = self._refusals.setdefault((app.key, ip), {})
        r = subs.get(org.key)
        news = r is None
        if r is None:
            r = subs[org.key] = Refusal(app, org, ip, now, now + self.ttl)
            self._count += 1
            self._tombstones.pop((app.key, ip, org.key), None)
            self._bound()
        else:
            r.at, r.retest = now, now + self.ttl  # seen again (a re-test, or a call that raced the first)
            r.org = org if org.known else r.org
        r.touched = mono
        # A refusal is written at once when new, else at least every half TTL (a restart must not load it as
        # older than it is by more than that); to Redis every time (refusals are rare: a first, then re-tests).
        store = news or now - r.stored >= min(STORE_EVERY, self.ttl / 2)
        if store:
            r.stored = now
        return news, [self._refusal_row(r)] if store else [], [("no", r)]

    def _allowed(self, app: App, org: Org, ip: str, now: float, mono: float) -> tuple[bool, list[Any], list[Any]]:
        fields: list[Any] = []
        rows: list[Any] = []
        subs = self._refusals.get((app.key, ip)) or {}
        wide = self._wide(app.key, ip, subs)
        mine = subs.pop(org.key, None)
        if mine is not None:  # this org's refusal is disproven
            self._count -= 1
            self._tombstones[(app.key, ip, org.key)] = mono
            rows.append(("drop", app.key, org.key, ip))
            fields.append(("drop", org.key, ip))
            event(log, logging.INFO, f"Salesforce accepted egress IP {ip} for app {app.label}, {org.label} again",
                  egress_ip=ip, app=app.label, org=org.id)
        acc = self._accepted.get((app.key, ip))
        newer_refusal = any(r.at > (acc.stored if acc else 0.0) for r in subs.values())
        before = dict(zip(subs, self._scopes(app.key, ip, subs.values()), strict=True))
        first = acc is None
        if acc is None:
            acc = self._accepted[(app.key, ip)] = Accepted(app, ip, now, org)
            self._bound_accepted()
        else:
            acc.add(org, now)
        acc.touched = mono
        if wide:  # a success disproves the app-wide refusal: the orgs that made it re-test their own first
            for r in wide:
                if r.org.key in subs:
                    r.retest = min(r.retest, now)
                    fields.append(("no", r))
            self._claims.pop((app.key, ip), None)
            event(log, logging.INFO, f"Salesforce accepted egress IP {ip} for app {app.label} ({org.label}): the app's "
                  "Refresh Token IP Allowlist admits it", egress_ip=ip, app=app.label, org=org.id)
        after = dict(zip(subs, self._scopes(app.key, ip, subs.values()), strict=True))
        proven = [r for k, r in subs.items() if before[k] != "org" and after[k] == "org"]
        for r in proven:
            event(log, logging.WARNING, f"Salesforce refuses egress IP {ip} for app {app.label}, {r.org.label} only: "
                  f"{org.label} redeemed through it, so the app's allowlist admits it and that org's own IP "
                  "restrictions refuse it (a profile's Login IP Ranges, or the app's IP relaxation set to Enforce "
                  "there); the fix is on the customer's side. The other orgs keep using it",
                  egress_ip=ip, app=app.label, org=r.org.id, scope="org")
        news = first or mine is not None or bool(wide) or bool(proven)
        # Every successful refresh repeats this: written at most every STORE_EVERY seconds, unless it is news
        # or a refusal through the IP is newer than what was written (the replicas count on "no success since").
        if news or newer_refusal or now - acc.stored >= STORE_EVERY:
            acc.stored = now
            rows.append(self._accepted_row(acc))
            fields.append(("ok", acc))
        return news, rows, fields

    def learnt(self, app: App | None, before: Org | None, org: Org) -> None:
        """An answer named the org of a grant that stood for it (``before``): its refusals are the org's."""
        if app is None or before is None or before.same(org) or self._key is None:
            return
        mono = self.monotonic()
        rows: list[Any] = []
        fields: list[Any] = []
        with self._lock:
            for (app_key, ip), subs in self._refusals.items():
                if app_key != app.key or before.key not in subs:
                    continue
                old = subs.pop(before.key)
                self._tombstones[(app.key, ip, before.key)] = mono
                rows.append(("drop", app.key, before.key, ip))
                fields.append(("drop", before.key, ip))
                r = subs.get(org.key)
                if r is None:
                    r = subs[org.key] = replace(old, org=org)
                    self._tombstones.pop((app.key, ip, org.key), None)
                else:
                    self._count -= 1
                    r.at, r.retest = max(r.at, old.at), max(r.retest, old.retest)
                r.touched, r.stored = mono, r.at
                rows.append(self._refusal_row(r))
                fields.append(("no", r))
            for acc in self._accepted.values():
                if acc.app.key == app.key and before.same(acc.org):
                    acc.org = org
                if acc.app.key == app.key and before.same(acc.other):
                    acc.other = org
        self._write(app, rows, fields)
        if rows:
            self.update_metrics()

    def announce(self, app: App | None, org: Org | None, egress_ip: str) -> None:
        """Say in the log what a new refusal means, once the call that met it is over (by then the org of
        its grant may be known from the retry's answer)."""
        if app is None:
            return
        org = org or NOBODY
        with self._lock:
            subs = self._refusals.get((app.key, egress_ip)) or {}
            if org.key not in subs:
                return  # disproven meanwhile
            scope = self._scope(app.key, egress_ip, subs[org.key])
            wide = self._wide(app.key, egress_ip, subs) or []
        ip, who = egress_ip, org.label
        if scope == "app":
            orgs = ", ".join(sorted(r.org.label for r in wide))
            text = (f"Salesforce refuses egress IP {ip} for app {app.label}: {len(wide)} orgs were refused through it "
                    f"({orgs}) and none has redeemed through it since, so it is not on that External Client App's "
                    "Refresh Token IP Allowlist; the guard keeps the app's redemptions off it and re-tests it every "
                    f"{self.ttl:g} s")
        elif scope == "org":
            text = (f"Salesforce refused egress IP {ip} for app {app.label}, {who} (ip restricted), while other orgs "
                    "redeem through it: that org's own IP restrictions refuse it (a profile's Login IP Ranges, or the "
                    "app's IP relaxation set to Enforce there), and the fix is on the customer's side; the guard sends "
                    "that org's redemptions through the other egress IPs")
        else:
            text = (f"Salesforce refused egress IP {ip} for app {app.label}, {who} (ip restricted by app developer), "
                    "and no org has redeemed through it yet: either it is missing from that External Client App's "
                    "Refresh Token IP Allowlist, or that org's own IP restrictions refuse it; the guard keeps that "
                    "org's redemptions off it")
        event(log, logging.WARNING, text, egress_ip=ip, app=app.label, org=org.id, scope=scope)

    def flush(self) -> None:
        """Write the answers whose latest time has not reached grants.sqlite3 yet (repeats within
        STORE_EVERY), at shutdown: a restart then knows each answer from when Salesforce last gave it."""
        if self.store is None:
            return
        rows: list[EvidenceRow] = []
        with self._lock:
            for subs in self._refusals.values():
                for r in subs.values():
                    if r.at > r.stored:
                        r.stored = r.at
                        rows.append(self._refusal_row(r))
            for acc in self._accepted.values():
                if acc.at > acc.stored:
                    acc.stored = acc.at
                    rows.append(self._accepted_row(acc))
        if rows:
            self.store.submit(Change(evidence=rows))

    # -- what the guard asks --------------------------------------------------------------------
    def said(self, app: App | None, org: Org | None, egress_ip: str | None) -> Said | None:
        """What Salesforce's answers say about a redemption for ``org`` and ``app`` through ``egress_ip``:
        refused (for this org, or for the app) and whether a re-test is due, allowed (some org redeemed
        through it and the app is not refused there), or None (nothing known)."""
        if app is None or not egress_ip:
            return None
        now = self.clock()
        with self._lock:
            subs = self._refusals.get((app.key, egress_ip)) or {}
            wide = self._wide(app.key, egress_ip, subs)
            wide_due = wide is not None and now >= self._wide_retest(app.key, egress_ip, wide)
            own = subs.get((org or NOBODY).key)
            if own is not None:
                return Said("refused", self._scope(app.key, egress_ip, own), now >= own.retest and (wide is None or wide_due))
            if wide is not None:
                return Said("refused", "app", wide_due)
            if (org is None or not org.known) and "unproven" in self._scopes(app.key, egress_ip, subs.values()):
                # A grant whose org no answer has named cannot be told apart from the org refused there, while
                # nothing proves that refusal the org's own: it keeps off the IP (the refused org re-tests it).
                return Said("refused", "unproven", False)
            return Said("allowed") if (app.key, egress_ip) in self._accepted else None

    def claim(self, app: App | None, org: Org | None, egress_ip: str) -> bool:
        """Take the re-test of a refused egress IP for this redemption, when one is due: the next one is then
        a TTL away (on every replica, through Redis), whatever this one's answer."""
        said = self.said(app, org, egress_ip)
        if app is None or said is None or said.kind != "refused" or not said.due:
            return False
        now, mono = self.clock(), self.monotonic()
        fields: list[Any] = []
        with self._lock:
            own = (self._refusals.get((app.key, egress_ip)) or {}).get((org or NOBODY).key)
            if own is not None:
                own.retest, own.touched = now + self.ttl, mono
                fields.append(("no", own))
            if said.scope == "app":
                self._claims[(app.key, egress_ip)] = now + self.ttl
                fields.append(("rt", egress_ip, now + self.ttl))
        self._write(app, [], fields)
        return True

    def _wide(self, app_key: bytes, ip: str, subs: dict[bytes, Refusal]) -> list[Refusal] | None:
        """The refusals that make ``ip`` refused for the whole app (at least app_orgs known orgs, none
        succeeded since), or None."""
        if not subs:
            return None
        acc = self._accepted.get((app_key, ip))
        since = acc.at if acc is not None else float("-inf")
        current = [r for r in subs.values() if r.at > since and r.org.known]
        return current if len({r.org.key for r in current}) >= self.app_orgs else None

    def _wide_retest(self, app_key: bytes, ip: str, wide: list[Refusal]) -> float:
        return max(max(r.at for r in wide) + self.ttl, self._claims.get((app_key, ip), 0.0))

    def _scope(self, app_key: bytes, ip: str, r: Refusal) -> Scope:
        return self._scopes(app_key, ip, [r])[0]

    def _scopes(self, app_key: bytes, ip: str, rs: Iterable[Refusal]) -> list[Scope]:
        """The scope of each refusal through ``ip`` (the app-wide rule worked out once for them all)."""
        wide = {id(w) for w in self._wide(app_key, ip, self._refusals.get((app_key, ip)) or {}) or ()}
        acc = self._accepted.get((app_key, ip))
        return ["app" if id(r) in wide else
                "org" if acc is not None and acc.by_other_than(r.org) else "unproven" for r in rs]

    # -- what people see ------------------------------------------------------------------------
    def findings(self) -> list[Finding]:
        """For each app and egress IP: its successes, and its refusals grouped by scope; newest first."""
        out: list[Finding] = []
        with self._lock:
            for (app_key, ip), acc in self._accepted.items():
                out.append(Finding(acc.app.label, ip, "allowed", None, (acc.org.label,) if acc.org else (), acc.at))
            for (app_key, ip), subs in self._refusals.items():
                wide = self._wide(app_key, ip, subs)
                groups: dict[Scope, list[Refusal]] = {}
                for r, scope in zip(subs.values(), self._scopes(app_key, ip, subs.values()), strict=True):
                    groups.setdefault(scope, []).append(r)
                for scope, rs in groups.items():
                    retest = self._wide_retest(app_key, ip, wide) if scope == "app" and wide else min(r.retest for r in rs)
                    out.append(Finding(rs[0].app.label, ip, "refused", scope,
                                       tuple(sorted(r.org.label for r in rs)), max(r.at for r in rs), retest))
        return sorted(out, key=lambda f: -f.at)

    def disagreements(self) -> list[Disagreement]:
        return disagreements(self.findings(), self.allowlist)

    def update_metrics(self) -> None:
        """Gauges per egress IP (never per app or org): apps for which Salesforce refuses it (scope app or
        unproven), orgs whose own restriction refuses it, and whether SIDECAR_ALLOWLIST disagrees. Called on
        news and every probe round (which also forgets refusals not seen for FORGET_AFTER)."""
        self._forget()
        findings = self.findings()
        refused: dict[str, int] = {}
        orgs: dict[str, int] = {}
        for f in findings:
            refused[f.egress_ip] = refused.get(f.egress_ip, 0) + (f.kind == "refused" and f.scope != "org")
            orgs[f.egress_ip] = orgs.get(f.egress_ip, 0) + (len(f.orgs) if f.scope == "org" else 0)
        disagree = {d.finding.egress_ip for d in disagreements(findings, self.allowlist)}
        ips = set(refused) | self._gauged
        for ip in ips:
            self.metrics.egress_ip_refused.labels(ip).set(refused.get(ip, 0))
            self.metrics.egress_ip_org_refused.labels(ip).set(orgs.get(ip, 0))
            self.metrics.allowlist_disagreement.labels(ip).set(1 if ip in disagree else 0)
        self._gauged = ips

    def _forget(self) -> None:
        now, mono = self.clock(), self.monotonic()
        rows: list[EvidenceRow | tuple[Any, ...]] = []
        with self._lock:
            for (app_key, ip), subs in list(self._refusals.items()):
                for key, r in list(subs.items()):
                    if now - r.at > FORGET_AFTER:
                        del subs[key]
                        self._count -= 1
                        rows.append(("drop", app_key, key, ip))
                if not subs:
                    del self._refusals[(app_key, ip)]
            for key, at in list(self._tombstones.items()):
                if mono - at > PENDING:
                    del self._tombstones[key]
        if rows and self.store is not None:
            self.store.submit(_change(rows))

    # -- bounds ---------------------------------------------------------------------------------
    def _bound(self) -> None:
        """Forget the least recently seen refusals beyond max_facts (in the file too)."""
        while self._count > self.max_facts:
            (app_key, ip), key = min(((k, s) for k, subs in self._refusals.items() for s in subs),
                                     key=lambda ks: self._refusals[ks[0]][ks[1]].at)
            del self._refusals[(app_key, ip)][key]
            self._count -= 1
            self._evicted.append(("drop", app_key, key, ip))
            if not self._refusals[(app_key, ip)]:
                del self._refusals[(app_key, ip)]

    def _bound_accepted(self) -> None:
        while len(self._accepted) > self.max_facts:
            app_key, ip = min(self._accepted, key=lambda k: self._accepted[k].at)
            del self._accepted[(app_key, ip)]
            self._evicted.append(("drop", app_key, ANY, ip))

    def _take_evicted(self) -> list[Any]:
        evicted, self._evicted = self._evicted, []
        return evicted

    # -- the store and Redis --------------------------------------------------------------------
    def _seal(self, value: dict[str, Any], context: bytes) -> bytes:
        assert self._sealer is not None
        return self._sealer.seal(json.dumps(value, separators=(",", ":")).encode(), context)

    def _unseal(self, sealed: bytes | None, context: bytes) -> dict[str, Any] | None:
        plain = self._sealer.open(sealed, context) if self._sealer is not None else None
        if plain is None:
            return None
        try:
            value = json.loads(plain)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def _refusal_row(self, r: Refusal) -> EvidenceRow:
        who = self._seal({"org": r.org.id, "user": r.org.user}, _row_context(r.app.key, r.org.key, r.egress_ip))
        return EvidenceRow(r.app.key, r.app.label, r.org.key, r.egress_ip, "refused", r.at, r.retest, who)

    def _accepted_row(self, acc: Accepted) -> EvidenceRow:
        who = self._seal(_accepted_value(acc), _row_context(acc.app.key, ANY, acc.egress_ip))
        return EvidenceRow(acc.app.key, acc.app.label, ANY, acc.egress_ip, "allowed", acc.at, None, who)

    def _load_row(self, row: EvidenceRow) -> None:
        app = App(row.app, row.label)
        self._labels.setdefault(app.key, app.label)
        value = self._unseal(row.who, _row_context(row.app, row.subject, row.egress_ip)) or {}
        if row.kind == "allowed" and row.subject == ANY:
            acc = _accepted_from(app, row.egress_ip, row.at, value)
            acc.stored = row.at
            self._accepted[(app.key, row.egress_ip)] = acc
        elif row.kind == "refused" and row.subject:
            org = Org(row.subject, value.get("org"), value.get("user"))
            subs = self._refusals.setdefault((app.key, row.egress_ip), {})
            if org.key not in subs:
                self._count += 1
            retest = row.retest if row.retest is not None else row.at + self.ttl
            subs[org.key] = Refusal(app, org, row.egress_ip, row.at, retest, stored=row.at)

    def _write(self, app: App, rows: list[Any], fields: list[Any]) -> None:
        if rows and self.store is not None:
            self.store.submit(_change(rows))
        shared = self.shared
        if not fields or shared is None or not shared.usable():
            return
        name = shared.evidence_name(app.key).encode()
        sets: dict[str, bytes] = {"app": self._seal({"label": app.label}, name + b"|app")}
        deletes: list[str] = []
        for f in fields:
            if f[0] == "no":
                r: Refusal = f[1]
                field = _field("no", r.egress_ip, r.org.key)
                sets[field] = self._seal({"at": r.at, "retest": r.retest, "org": r.org.id, "user": r.org.user},
                                         name + b"|" + field.encode())
            elif f[0] == "ok":
                acc: Accepted = f[1]
                field = _field("ok", acc.egress_ip)
                sets[field] = self._seal({"at": acc.at, **_accepted_value(acc)}, name + b"|" + field.encode())
            elif f[0] == "rt":
                field = _field("rt", f[1])
                sets[field] = self._seal({"at": f[2]}, name + b"|" + field.encode())
            else:  # drop
                field = _field("no", f[2], f[1])
                sets.pop(field, None)
                deletes.append(field)
        try:
            shared.write_evidence(app.key, sets, deletes, FORGET_AFTER)
        except RuntimeError:  # no event loop (a test without one): memory and SQLite have it
            pass

    def share(self, shared: SharedState) -> None:
        """Keep the evidence with the other replicas on Redis (sealed): read before each call is routed."""
        self.shared = shared

    async def pull_all(self) -> None:
        """At start: what the replicas learnt for every app (bounded), so /status and the guard know it."""
        if self.shared is None or not self.shared.usable():
            return
        from sidecar.token.shield import Unavailable

        try:
            apps = await self.shared.evidence_apps()
        except Unavailable:
            return
        for key in apps:
            await self._pull(key)
        self.update_metrics()

    async def pull(self, app: App | None) -> None:
        """Before a call of ``app`` is routed: what the replicas know of it (one Redis read, shared by the
        calls of that app waiting at the same moment; bounded by Redis's deadline, and skipped while Redis
        is down: then this replica's own memory decides)."""
        if app is None or self.shared is None or not self.shared.usable():
            return
        self._labels.setdefault(app.key, app.label)
        running = self._pulls.get(app.key)
        if running is not None:
            await asyncio.shield(running)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pulls[app.key] = future
        try:
            if await self._pull(app.key):
                self.update_metrics()
        finally:
            del self._pulls[app.key]
            future.set_result(None)

    async def _pull(self, app_key: bytes) -> bool:
        """Merge one app's evidence from Redis into memory; True when something changed."""
        from sidecar.token.shield import Unavailable

        assert self.shared is not None
        try:
            fields = await self.shared.evidence(app_key)
        except Unavailable:
            return False
        except Exception as exc:  # noqa: BLE001 - reading the replicas' view must never break a token call
            event(log, logging.ERROR, f"reading the evidence from Redis failed ({type(exc).__name__}); this "
                  "replica's own evidence decides")
            return False
        name = self.shared.evidence_name(app_key).encode()
        values = {f: v for f, sealed in fields.items() if (v := self._unseal(sealed, name + b"|" + f.encode())) is not None}
        with self._lock:
            label = (values.get("app") or {}).get("label") or self._labels.get(app_key) or app_key.hex()[:12]
            app = App(app_key, str(label))
            self._labels.setdefault(app_key, app.label)
            return self._merge(app, values, self.monotonic())

    def _merge(self, app: App, values: dict[str, dict[str, Any]], mono: float) -> bool:
        """Redis is the replicas' common view: what it holds comes in (the newer of two answers wins), and a
        refusal it no longer holds (another replica saw a success) goes, unless this replica changed it
        within PENDING seconds (its own write may still be on its way). Called under the lock."""
        changed = False
        remote: dict[tuple[str, bytes], dict[str, Any]] = {}
        for field, v in values.items():
            parts = field.split("|")
            try:
                if parts[0] == "no" and len(parts) == 3:
                    remote[(parts[1], bytes.fromhex(parts[2]))] = v
                elif parts[0] == "ok" and len(parts) == 2:
                    changed |= self._merge_accepted(app, parts[1], v)
                elif parts[0] == "rt" and len(parts) == 2:
                    at = float(v["at"])
                    if at > self._claims.get((app.key, parts[1]), 0.0):
                        self._claims[(app.key, parts[1])] = at
            except (ValueError, KeyError, TypeError):
                continue
        for (ip, key), v in remote.items():
            if mono - self._tombstones.get((app.key, ip, key), float("-inf")) <= PENDING:
                continue
            try:
                at, retest = float(v["at"]), float(v["retest"])
            except (KeyError, TypeError, ValueError):
                continue
            if self.clock() - at > FORGET_AFTER:
                continue
            subs = self._refusals.setdefault((app.key, ip), {})
            r = subs.get(key)
            org = Org(key, v.get("org"), v.get("user"))
            if r is None:
                subs[key] = Refusal(app, org, ip, at, retest, stored=0.0)
                self._count += 1
                changed = True
            elif at > r.at or retest > r.retest:
                r.at, r.retest = max(r.at, at), max(r.retest, retest)
                r.org = org if org.known else r.org
                changed = True
        for (app_key, ip), subs in list(self._refusals.items()):
            if app_key != app.key:
                continue
            for key, r in list(subs.items()):
                if (ip, key) not in remote and mono - r.touched > PENDING:
                    del subs[key]
                    self._count -= 1
                    changed = True
            if not subs:
                del self._refusals[(app_key, ip)]
        self._bound()
        return changed

    def _merge_accepted(self, app: App, ip: str, v: dict[str, Any]) -> bool:
        """The newer successes of the two views: the latest, and the latest of another org."""
        theirs = _accepted_from(app, ip, float(v["at"]), v)
        mine = self._accepted.get((app.key, ip))
        if mine is None:
            self._accepted[(app.key, ip)] = theirs
            self._bound_accepted()
            return True
        before = (mine.at, mine.org, mine.other_at, mine.other)
        seen = sorted(((at, org) for at, org in ((mine.at, mine.org), (mine.other_at, mine.other),
                                                  (theirs.at, theirs.org), (theirs.other_at, theirs.other))
                       if at is not None), key=lambda x: -x[0])
        mine.at, mine.org = seen[0]
        rest = [(at, org) for at, org in seen[1:] if org is not None and not org.same(mine.org)]
        mine.other_at, mine.other = rest[0] if rest else (None, None)
        return before != (mine.at, mine.org, mine.other_at, mine.other)


def _field(kind: str, ip: str, subject: bytes | None = None) -> str:
    return f"{kind}|{ip}" if subject is None else f"{kind}|{ip}|{subject.hex()}"


def _row_context(app: bytes, subject: bytes, ip: str) -> bytes:
    return b"evidence " + app + b"|" + subject + b"|" + ip.encode()


def _org_value(org: Org | None) -> list[str | None] | None:
    return None if org is None else [org.key.hex(), org.id, org.user]


def _org_from(value: Any) -> Org | None:
    if not isinstance(value, list) or len(value) != 3 or not isinstance(value[0], str):
        return None
    try:
        return Org(bytes.fromhex(value[0]), value[1], value[2])
    except ValueError:
        return None


def _accepted_value(acc: Accepted) -> dict[str, Any]:
    return {"org": _org_value(acc.org), "other_at": acc.other_at, "other": _org_value(acc.other)}


def _accepted_from(app: App, ip: str, at: float, value: dict[str, Any]) -> Accepted:
    other_at = value.get("other_at")
    return Accepted(app, ip, at, _org_from(value.get("org")),
                    float(other_at) if isinstance(other_at, int | float) else None, _org_from(value.get("other")))


def _change(rows: list[Any]) -> Change:
    change = Change()
    for row in rows:
        if isinstance(row, EvidenceRow):
            change.evidence.append(row)
        else:
            change.drop_evidence.append(row[1:])
    return change
