"""What Salesforce answered through each egress IP, per app: the evidence the guard and the verdict follow.

A typed copy of the Refresh Token IP Allowlist (``SIDECAR_ALLOWLIST``) is a hint; Salesforce's answers
are the truth. A successful redemption of a grant the allowlist applies to (``refresh_token``,
``authorization_code``) through egress IP X is evidence that X is on the allowlist of the app that made
it (the ``client_id`` Salesforce sees); an ``ip restricted`` answer through X is evidence that it is not.
The latest of the two is kept per (app, X), with its time; a refusal counts for ``SIDECAR_EVIDENCE_TTL``
seconds, so an allowlist fixed in Salesforce is picked up without a restart.

Nothing here is secret: apps are known by a keyed hash of their ``client_id`` and a shortened form for
people (``3MVG9d…_Xq``); facts are kept in memory (bounded) and in ``grants.sqlite3`` so a restart keeps
them.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from sidecar.egress.allowlist import Allowlist
from sidecar.logs import event
from sidecar.metrics import Metrics
from sidecar.state.sqlite import Change, EvidenceRow, GrantStore

log = logging.getLogger("egress_sidecar.evidence")

Kind = Literal["allowed", "refused"]
MAX_FACTS = 10_000  # (app, egress IP) pairs kept; the least recently updated go first
STORE_EVERY = 60.0  # seconds between writes of an unchanged answer
MAX_CACHED_ID = 256  # longer client_ids are hashed each time, never kept
MAX_APPS_CACHED = 1024  # client_id -> App hashes kept (cleared when full: a flood of made-up ids costs only CPU)
_APP_CONTEXT = b"egress-sidecar app"


def short_client_id(client_id: str) -> str:
    """A client_id for people: enough to tell apps apart, not the whole consumer key."""
    return client_id if len(client_id) <= 12 else f"{client_id[:6]}…{client_id[-4:]}"


@dataclass(frozen=True, slots=True)
class App:
    key: bytes  # HMAC of the client_id under the install key
    label: str  # short_client_id


@dataclass(frozen=True, slots=True)
class Fact:
    app: App
    egress_ip: str
    kind: Kind
    at: float
    stored: float = 0.0  # when this answer was last written to grants.sqlite3


@dataclass(frozen=True, slots=True)
class Disagreement:
    """SIDECAR_ALLOWLIST says one thing about an egress IP, Salesforce's answers another."""

    fact: Fact
    listed: bool  # whether SIDECAR_ALLOWLIST lists the IP


class Evidence:
    """Thread-safe (the admin server reads it). Records nothing until :meth:`open` gives it the key."""

    def __init__(self, metrics: Metrics, ttl: float, allowlist: Allowlist, *, clock: Callable[[], float] = time.time,
                 max_facts: int = MAX_FACTS) -> None:
        self.metrics = metrics
        self.ttl = ttl
        self.allowlist = allowlist  # SIDECAR_ALLOWLIST, for the disagreements
        self.clock = clock
        self.max_facts = max_facts
        self.store: GrantStore | None = None
        self._key: bytes | None = None
        self._facts: OrderedDict[tuple[bytes, str], Fact] = OrderedDict()  # least recently updated first
        self._lock = threading.Lock()
        self._gauged: set[str] = set()
        self._apps: dict[str, App] = {}  # client_id -> App, for this key

    def open(self, key: bytes, store: GrantStore | None = None) -> None:
        """Take the install key and the facts kept in ``store`` (those a restart must not forget)."""
        self._key = key
        self._apps.clear()
        self.store = store
        if store is not None:
            with self._lock:
                for row in store.load_evidence(self.max_facts):
                    fact = Fact(App(row.app, row.label), row.egress_ip, row.kind, row.at, row.at)  # type: ignore[arg-type]
                    self._facts[(row.app, row.egress_ip)] = fact
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

    # -- learning -------------------------------------------------------------------------------
    def record(self, app: App | None, egress_ip: str | None, kind: Kind) -> Fact | None:
        """What Salesforce answered for ``app`` through ``egress_ip``. Returns the fact when it is news
        (a first answer, or the other kind than before), None otherwise."""
        if app is None or not egress_ip:
            return None
        now = self.clock()
        with self._lock:
            before = self._facts.pop((app.key, egress_ip), None)
            news = before is None or before.kind != kind or not self._live(before, now)
            # The same answer again (every successful refresh says it): written at most every STORE_EVERY
            # seconds (a refusal: every half SIDECAR_EVIDENCE_TTL at most, so a restart never loads a live
            # refusal as expired), not once per call; a restart then knows it from at most that long ago.
            stored = before.stored if before is not None else 0.0
            every = STORE_EVERY if kind == "allowed" else min(STORE_EVERY, self.ttl / 2)  # a refusal expires
            store = self.store is not None and (news or now - stored >= every)
            fact = Fact(app, egress_ip, kind, now, now if store else stored)
            self._facts[(app.key, egress_ip)] = fact
            while len(self._facts) > self.max_facts:
                self._facts.popitem(last=False)
        if store and self.store is not None:
            self.store.submit(Change(evidence=[EvidenceRow(app.key, app.label, egress_ip, kind, now)]))
        if news:
            self.update_metrics()
        if kind == "refused" and news:
            event(log, logging.WARNING, f"Salesforce refused egress IP {egress_ip} for app {app.label} "
                  "(ip restricted by app developer): it is not on that External Client App's Refresh Token IP "
                  "Allowlist", egress_ip=egress_ip, app=app.label)
        elif kind == "allowed" and before is not None and before.kind == "refused":
            event(log, logging.INFO, f"Salesforce accepted egress IP {egress_ip} for app {app.label} again",
                  egress_ip=egress_ip, app=app.label)
        return fact if news else None

    def flush(self) -> None:
        """Write the answers whose latest time has not reached grants.sqlite3 yet (repeats within
        STORE_EVERY), at shutdown: a restart then knows each answer from when Salesforce last gave it."""
        if self.store is None:
            return
        with self._lock:
            behind = [(k, f) for k, f in self._facts.items() if f.at > f.stored]
            for k, f in behind:
                self._facts[k] = replace(f, stored=f.at)  # (in place: the order stays least recently updated first)
        if behind:
            self.store.submit(Change(evidence=[EvidenceRow(f.app.key, f.app.label, f.egress_ip, f.kind, f.at)
                                               for _, f in behind]))

    def _live(self, fact: Fact, now: float) -> bool:
        return fact.kind == "allowed" or now - fact.at < self.ttl

    # -- what the guard asks --------------------------------------------------------------------
    def state(self, app: App | None, egress_ip: str | None) -> Kind | None:
        """The latest live answer for (app, IP): "allowed", "refused", or None (nothing known)."""
        if app is None or not egress_ip:
            return None
        with self._lock:
            fact = self._facts.get((app.key, egress_ip))
        return fact.kind if fact is not None and self._live(fact, self.clock()) else None

    # -- what people see ------------------------------------------------------------------------
    def facts(self) -> list[Fact]:
        """Live facts, newest first."""
        now = self.clock()
        with self._lock:
            facts = list(self._facts.values())
        return sorted((f for f in facts if self._live(f, now)), key=lambda f: -f.at)

    def disagreements(self) -> list[Disagreement]:
        """Where SIDECAR_ALLOWLIST and Salesforce disagree: a listed IP refused, an unlisted IP accepted."""
        if not self.allowlist:
            return []
        out = []
        for fact in self.facts():
            listed = self.allowlist.contains(fact.egress_ip)
            if listed == (fact.kind == "refused"):
                out.append(Disagreement(fact, listed))
        return out

    def update_metrics(self) -> None:
        """Gauges per egress IP (never per app): how many apps Salesforce refuses through it, and whether
        SIDECAR_ALLOWLIST disagrees with Salesforce about it. Called on news and every probe round, so a
        refusal that expired leaves the gauges."""
        facts = self.facts()
        refused: dict[str, int] = {}
        for f in facts:
            refused[f.egress_ip] = refused.get(f.egress_ip, 0) + (f.kind == "refused")
        disagree = {d.fact.egress_ip for d in self.disagreements()}
        ips = set(refused) | self._gauged
        for ip in ips:
            self.metrics.egress_ip_refused.labels(ip).set(refused.get(ip, 0))
            self.metrics.allowlist_disagreement.labels(ip).set(1 if ip in disagree else 0)
        self._gauged = ips
